"""Multi-worker (Ray Train DDP) trials, the ray#54305 workaround, and resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import ray
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.tuning.test_sweep import children, small_spec
from tuning.sweep import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GATE_PLUGIN = ROOT / "tests" / "reliability" / "gate"
"""A sitecustomize.py that holds every trial after the first while the gate is armed."""


def _reserved_groups() -> list[str]:
    table = ray.util.placement_group_table()
    return [pg_id for pg_id, info in table.items() if info["state"] == "CREATED"]


def test_asha_stopping_multi_worker_trials_does_not_starve_later_ones(
        ray_session, tmp_path, monkeypatch, mlflow_uri):
    """Two-worker DDP trials on CPU, and ray#54305: more multi-worker trials under ASHA than
    fit at once must all run."""
    before = set(_reserved_groups())
    # two fit at once: the last two start only when a stopped or finished trial's placement
    # group is given back; the 1e-5 trials after the 3e-3 one are stopped at a rung
    space = {"train.lr": {"grid": [1e-5, 3e-3, 1e-5, 1e-5]}}
    spec = small_spec(tmp_path, monkeypatch, mlflow_uri, **{
        "tune.search": "asha", "tune.space": space, "tune.num_samples": 1,
        "tune.max_concurrent": 2, "train.epochs": 6, "tune.grace_period": 1,
        "tune.reduction_factor": 2, "train.optimizer": "sgd", "train.momentum": 0.0,
        "resources.workers_per_trial": 2, "resources.cpus_per_worker": 0.9})
    result = run_sweep(spec, quiet=True, register=False)
    assert result.test_metrics["test_accuracy"] > 0.75  # the two ranks trained one model
    kids = children(mlflow_uri, result.parent_run_id)
    assert len(kids) == 4
    assert {k.info.status for k in kids} == {"FINISHED"}
    statuses = [k.data.tags["rungwise.status"] for k in kids]
    assert "stopped_by_scheduler" in statuses, statuses
    cl = MlflowClient(mlflow_uri)
    for kid in kids:  # every epoch once, from rank 0 only; a stopped trial up to its rung
        steps = [m.step for m in cl.get_metric_history(kid.info.run_id, "val_loss")]
        last = 6 if kid.data.tags["rungwise.status"] == "finished" else len(steps)
        assert steps == list(range(1, last + 1)), (kid.data.tags["rungwise.status"], steps)
    assert "finished" in statuses, statuses
    # Ray removes a group asynchronously: wait for the event, not for a fixed time
    deadline = time.time() + 120
    while set(_reserved_groups()) - before and time.time() < deadline:
        time.sleep(0.5)
    assert set(_reserved_groups()) - before == set()


DRIVER = """
import sys
from jobs.spec import load_spec
from tuning.sweep import run_sweep
spec = load_spec(sys.argv[1]).with_overrides({overrides!r})
run_sweep(spec, resume=len(sys.argv) > 2)
"""


def test_resume_after_the_driver_is_killed(ray_session, tmp_path, monkeypatch, mlflow_uri):
    overrides = {"train.epochs": 6, "train.early_stopping": None, "tune.num_samples": 5,
                 "tune.max_concurrent": 1, "tune.search": "random",
                 "tune.space": {"train.lr": {"loguniform": [1e-3, 1e-2]}},
                 "tracking.uri": mlflow_uri, "tracking.register_as": "resumed",
                 "model.hidden": [16]}
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER.format(overrides=overrides)))
    gate = tmp_path / "gate"  # the trials after the first wait (see the gate plugin): the
    gate.mkdir()              # kill lands mid-sweep however fast or loaded the machine is
    env = {**os.environ, "RUNGWISE_STORAGE": str(tmp_path / "runs"), "RAY_ADDRESS": "",
           "PYTHONPATH": f"{GATE_PLUGIN}{os.pathsep}{ROOT}", "RUNGWISE_TEST_GATE": str(gate)}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT / "examples/adult.yaml")],
                            cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _kill_after_a_finished_trial(proc, mlflow_uri)
    assert len(list(gate.glob("claim-*"))) >= 2  # a second trial was held at the gate
    monkeypatch.setenv("RUNGWISE_STORAGE", str(tmp_path / "runs"))
    from jobs.spec import load_spec

    spec = load_spec(ROOT / "examples/adult.yaml").with_overrides(overrides)
    result = run_sweep(spec, resume=True, quiet=True)
    kids = children(mlflow_uri, result.parent_run_id)
    trial_ids = [k.data.tags["rungwise.trial_id"] for k in kids]
    assert len(trial_ids) == 5 and len(set(trial_ids)) == 5, trial_ids
    assert {k.info.status for k in kids} == {"FINISHED"}
    parent = MlflowClient(mlflow_uri).get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("rungwise.resumed") == "true"
    exp = parent.info.experiment_id
    parents = MlflowClient(mlflow_uri).search_runs([exp], "tags.`rungwise.kind` = 'sweep'")
    assert len(parents) == 1
    # no orphan: nothing the killed driver left RUNNING stays RUNNING after the resume
    running = MlflowClient(mlflow_uri).search_runs([exp], "attributes.status = 'RUNNING'")
    assert running == [], [(r.info.run_name, r.data.tags.get("rungwise.trial_id"))
                           for r in running]


def _kill_after_a_finished_trial(proc: subprocess.Popen[str], uri: str,
                                 timeout: float = 600) -> None:
    cl = MlflowClient(uri)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"driver ended before it was killed:\n{out[-3000:]}")
        try:
            exps = [e.experiment_id for e in cl.search_experiments()]
            done = cl.search_runs(exps, "attributes.status = 'FINISHED'") if exps else []
        except Exception:
            done = []
        if done:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            return
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the driver did not finish a trial in time")
