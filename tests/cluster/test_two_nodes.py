"""rungwise on a real two-node Ray cluster whose worker cannot see the head's disk (see
conftest.py): storage in a bucket works end to end, a local storage folder is refused by the
preflight before anything is written, a killed driver resumes from the bucket, and the retrain
lease in the bucket keeps a second retrain out wherever it is started from.

The driver runs as ``python -m jobs ... --address HEAD`` in a subprocess on the head's side;
MLflow is a SQLite file in the driver's folder (trials never talk to MLflow).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.cluster.conftest import BUCKET, Cluster, alive_nodes
from tests.conftest import DATA, EXAMPLES, sqlite_store

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAME = "rw-cluster"
NUM_SAMPLES = 4


def write_spec(folder: Path, uri: str, *, epochs: int = 3, concurrent: int = 2,
               retrain: str = "sweep") -> Path:
    spec = yaml.safe_load((EXAMPLES / "adult.yaml").read_text())
    spec["name"] = NAME
    spec["data"]["path"] = str(DATA / "adult" / "adult-train.csv.gz")
    spec["model"]["hidden"] = [16]
    spec["train"].update(epochs=epochs, early_stopping=None, batch_size=1024)
    spec["tune"].update(search="random", num_samples=NUM_SAMPLES, max_concurrent=concurrent,
                        space={"train.lr": {"loguniform": [1e-3, 1e-2]}})
    spec["resources"].update(gpus_per_worker=0, cpus_per_worker=1)
    spec["tracking"].update(uri=uri, register_as=NAME)
    spec["schedule"].update(retrain=retrain)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def rungwise(cluster: Cluster, cwd: Path, *args: str,
             timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd, env=cluster.env,
                          text=True, capture_output=True, timeout=timeout)


def runs(uri: str) -> list[Any]:
    cl = MlflowClient(uri)
    exps = [e.experiment_id for e in cl.search_experiments()]
    return list(cl.search_runs(exps, max_results=1000)) if exps else []


def children(uri: str) -> list[Any]:
    return [r for r in runs(uri) if r.data.tags.get("mlflow.parentRunId")]


def bucket_files(cluster: Cluster, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = cluster.s3().get_file_info(  # type: ignore[attr-defined]
        pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert out.returncode == 2, out.stdout + out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rungwise: error: "), out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def checkpointed_trials(files: list[str]) -> set[str]:
    """Ids of the trials whose folder (``.../<sweep>/run_trial_<id>_.../checkpoint_*/``) holds a
    checkpoint. By id, not folder: a trial that a killed driver had started but not yet saved
    in Tune's state is started again on resume, in a new folder."""
    import re

    from tuning.trainable import CKPT_FILE

    return {m.group(1) for f in files if f.endswith("/" + CKPT_FILE)
            and (m := re.search(r"/run_trial_([0-9a-f]+_\d+)_[^/]*/checkpoint_", f))}


def test_local_storage_is_refused_by_the_preflight(cluster: Cluster) -> None:
    folder = cluster.work / "b"
    uri = sqlite_store(folder)
    spec = write_spec(folder, uri)
    out = rungwise(cluster, folder, "tune", str(spec), "--address", cluster.address,
                   "--set", f"tune.storage={folder / 'runs'}")
    workers = [str(n["id"]) for n in alive_nodes(cluster) if n["cpus"]]
    assert len(workers) == 1
    line = one_line_error(out, "tune.storage: node ", f"(node id {workers[0][:12]})",
                          str(folder / "runs"), "not visible from this node", "s3://")
    assert "RUNGWISE_STORAGE" in line
    assert runs(uri) == []
    assert not list((folder / "runs").rglob(".rungwise-preflight/*"))  # cleaned up


def wait_for_finished_trials(proc: subprocess.Popen[str], uri: str, log: Path, n: int = 1,
                             timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before it was killed (rc {proc.returncode})"
                                 f":\n{log.read_text()[-3000:]}")
        try:
            done = [r for r in children(uri) if r.info.status == "FINISHED"]
        except Exception:  # the store is being created
            done = []
        if len(done) >= n:
            return
        time.sleep(1)
    raise AssertionError("no trial finished in time")


def test_sweep_in_the_bucket_killed_then_resumed_from_another_folder(cluster: Cluster) -> None:
    """One sweep, two checks: a sweep with its storage in the bucket (checkpoints, state file
    and nothing on the driver's disk; the best model registered), and a driver SIGKILLed in
    the middle of it that is resumed from another folder, where nothing of it lies."""
    folder = cluster.work / "c"
    uri = sqlite_store(folder)
    spec = write_spec(folder, uri, epochs=4, concurrent=1)
    storage = f"tune.storage={cluster.bucket_uri('c')}"
    log = folder / "killed.log"
    cluster.gate.mkdir()  # trials after the first wait: the kill comes while the sweep runs
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "jobs", "tune", str(spec), "--address",
                                 cluster.address, "--set", storage], cwd=folder,
                                env=cluster.env, text=True, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        try:
            wait_for_finished_trials(proc, uri, log)
        finally:
            os.kill(proc.pid, signal.SIGKILL)  # no handler runs: runs stay RUNNING
            proc.wait(30)
            shutil.rmtree(cluster.gate)  # disarmed: the resumed trials go ahead
    assert any(r.info.status == "RUNNING" for r in runs(uri))
    state = json.loads(cluster.s3().open_input_stream(  # type: ignore[attr-defined]
        f"{BUCKET}/c/{NAME}/rungwise-sweep.json").read())
    assert state["experiment_path"].startswith(f"s3://{BUCKET}/c/{NAME}/sweep-")
    other = cluster.work / "c-resume"  # nothing on the driver's disk is needed to resume
    other.mkdir()
    out = rungwise(cluster, other, "tune", str(spec), "--resume", "--address",
                   cluster.address, "--set", storage)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    kids = children(uri)
    assert len(kids) == NUM_SAMPLES, [(r.info.run_name, r.info.status) for r in kids]
    assert {r.info.status for r in kids} == {"FINISHED"}, (
        [(r.info.run_name, r.info.status, r.data.tags.get("rungwise.error")) for r in kids],
        out.stderr[-3000:])
    assert [r.info.status for r in runs(uri) if not r.data.tags.get("mlflow.parentRunId")] \
        == ["FINISHED"]
    files = bucket_files(cluster, f"c/{NAME}")
    assert len(checkpointed_trials(files)) == NUM_SAMPLES, files
    assert f"{BUCKET}/c/{NAME}/rungwise-sweep.json" in files
    for driver in (folder, other):  # nothing kept on either driver's disk
        assert not (driver / "rungwise-runs").exists()
    versions = MlflowClient(uri).search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert "registered: " in out.stdout


def test_retrain_lease_in_the_bucket_refuses_a_retrain_from_another_folder(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.retrain import lock_path, retrain_lock
    from jobs.spec import load_spec

    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, cluster.env[key])
    first, second = cluster.work / "d1", cluster.work / "d2"
    uri = sqlite_store(first)
    spec_file = write_spec(first, uri, retrain="refit")
    storage = f"tune.storage={cluster.bucket_uri('d')}"
    spec = load_spec(spec_file, {"tune.storage": cluster.bucket_uri("d")})
    lease = f"{BUCKET}/d/{NAME}/retrain.lock"
    second.mkdir()
    with retrain_lock(spec):  # a retrain started from the first folder holds it
        assert lease in bucket_files(cluster, "d")
        out = rungwise(cluster, second, "retrain", str(spec_file), "--set", storage)
    one_line_error(out, f"another retrain of {NAME!r} is running",
                   f"lease s3://{lease}", "--wait")
    assert runs(uri) == []
    assert lease not in bucket_files(cluster, "d")  # released
    out = rungwise(cluster, second, "retrain", str(spec_file), "--set", storage)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PROMOTED" in out.stdout and str(lock_path(spec)) == f"s3://{lease}"


def test_submit_to_the_split_cluster_then_predict_from_another_folder(
        cluster: Cluster, mlflow_s3: str) -> None:
    import pandas as pd

    folder = cluster.work / "g"
    spec = write_spec(folder, mlflow_s3)
    (folder / "pyproject.toml").write_text("")  # the folder shipped as the job's working_dir
    out = rungwise(cluster, folder, "submit", str(spec), "--address", cluster.dashboard,
                   "--command", "tune", "--set", f"tune.storage={cluster.bucket_uri('g')}",
                   "--follow")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.rstrip().endswith("status: SUCCEEDED")
    kids = children(mlflow_s3)
    assert len(kids) == NUM_SAMPLES and {r.info.status for r in kids} == {"FINISHED"}
    assert len(checkpointed_trials(bucket_files(cluster, f"g/{NAME}"))) == NUM_SAMPLES
    assert any(f.endswith("/MLmodel") for f in bucket_files(cluster, "mlartifacts"))
    # another working folder, no S3 credentials: the model comes through the server's proxy
    other = cluster.work / "g-predict"
    other.mkdir()
    rows = pd.read_csv(DATA / "adult" / "adult-train.csv.gz", header=None, nrows=20)
    rows.iloc[:5, 1] = "?"  # missing workclass: the bundled imputer fills it
    rows.to_csv(other / "rows.csv", header=False, index=False)
    env = {k: v for k, v in cluster.env.items() if not k.startswith("AWS_")}
    pred = subprocess.run([sys.executable, "-m", "jobs", "predict", str(spec), "--input",
                           "rows.csv", "--output", "out.csv"], cwd=other, env=env, text=True,
                          capture_output=True, timeout=300)
    assert pred.returncode == 0, pred.stderr[-3000:]
    got = pd.read_csv(other / "out.csv")
    assert len(got) == 20 and got["prediction"].notna().all()
