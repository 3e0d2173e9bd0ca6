"""`rungwise tune` stopped by a signal (SIGTERM from a scheduler or Kubernetes, SIGINT from
Ctrl-C) in the middle of a sweep: exit 130, a resume hint, no MLflow run left RUNNING, and
``--resume`` finishes the same sweep with exactly one child run per trial.

The sweep runs as a real ``python -m jobs tune SPEC`` subprocess with its own local Ray (it is
started in a new session, and whatever is left of that session is killed at the end); the
resume runs in this process on the session's shared Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import EXAMPLES, ROOT
from tests.tuning.test_sweep import children

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NUM_SAMPLES = 4
GATE_PLUGIN = Path(__file__).with_name("gate")
"""Holds a sitecustomize.py that gates ``trainer.loop.fit`` (see there): the sweep cannot
finish before the signal, on a quiet or a loaded machine."""


def write_spec(tmp_path: Path, uri: str) -> Path:
    spec = yaml.safe_load((EXAMPLES / "adult.yaml").read_text())
    spec["name"] = "adult-signals"
    spec["data"]["path"] = str((EXAMPLES / spec["data"]["path"]).resolve())
    spec["model"]["hidden"] = [16]
    spec["train"].update(epochs=4, early_stopping=None)
    spec["tune"].update(search="random", num_samples=NUM_SAMPLES, max_concurrent=1,
                        space={"train.lr": {"loguniform": [1e-3, 1e-2]}})
    spec["resources"]["gpus_per_worker"] = 0
    spec["tracking"].update(uri=uri, register_as="adult-signals")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def all_runs(uri: str) -> list[Any]:
    cl = MlflowClient(uri)
    exps = [e.experiment_id for e in cl.search_experiments()]
    return cl.search_runs(exps, max_results=1000) if exps else []


def wait_for_a_finished_trial(proc: subprocess.Popen[str], uri: str,
                              timeout: float = 420) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`rungwise tune` ended before the signal "
                                 f"(rc {proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        try:
            done = [r for r in all_runs(uri) if r.info.status == "FINISHED"
                    and r.data.tags.get("rungwise.trial_id")]
        except Exception:  # the store is being created
            done = []
        if done:
            return
        time.sleep(1)
    raise AssertionError("no trial finished in time")


def kill_session(proc: subprocess.Popen[str]) -> None:
    """Whatever the run left behind in its session (Ray's processes): SIGKILL, by group id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_sweep_cleanly_and_resume_finishes_it(
        ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str,
        sig: signal.Signals) -> None:
    path = write_spec(tmp_path, mlflow_uri)
    storage = tmp_path / "runs"
    gate = tmp_path / "gate"  # every trial after the first waits for gate/go (never made)
    gate.mkdir()
    env = {**os.environ, "RUNGWISE_STORAGE": str(storage), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{GATE_PLUGIN}{os.pathsep}{ROOT}", "RUNGWISE_TEST_GATE": str(gate)}
    for key in ("RAY_ADDRESS", "RUNGWISE_DEBUG"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "tune", str(path)], cwd=tmp_path,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_a_finished_trial(proc, mlflow_uri)
        signalled = time.time()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=180)
        stopped_in = time.time() - signalled
    finally:
        kill_session(proc)

    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and str(path) in err, err[-3000:]
    assert stopped_in < 120, stopped_in
    runs = all_runs(mlflow_uri)
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    [parent] = [r for r in runs if r.data.tags.get("rungwise.kind") == "sweep"]
    assert parent.info.status == "KILLED"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    finished = [k for k in kids if k.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.tags["rungwise.status"] == "finished"
    killed = [k for k in kids if k.info.status == "KILLED"]
    assert all(k.data.tags["rungwise.status"] == "killed" for k in killed)
    assert len(finished) + len(killed) == len(kids) <= NUM_SAMPLES
    assert len(list(gate.glob("claim-*"))) >= 2  # a second trial was held at the gate

    # --resume: the same parent, one child per trial, nothing left open
    from jobs.spec import load_spec
    from tuning.sweep import run_sweep

    monkeypatch.setenv("RUNGWISE_STORAGE", str(storage))
    result = run_sweep(load_spec(path), resume=True, quiet=True, register=False)
    assert result.parent_run_id == parent.info.run_id
    kids = children(mlflow_uri, result.parent_run_id)
    ids = [k.data.tags["rungwise.trial_id"] for k in kids]
    assert len(ids) == NUM_SAMPLES and len(set(ids)) == NUM_SAMPLES, ids
    assert {k.info.status for k in kids} == {"FINISHED"}
    cl = MlflowClient(mlflow_uri)
    for kid in kids:
        steps = [m.step for m in cl.get_metric_history(kid.info.run_id, "val_loss")]
        assert sorted(steps) == [1, 2, 3, 4], steps
    assert cl.get_run(result.parent_run_id).info.status == "FINISHED"
    assert [r for r in all_runs(mlflow_uri) if r.info.status == "RUNNING"] == []
