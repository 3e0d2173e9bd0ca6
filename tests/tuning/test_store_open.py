"""Two processes opening one fresh SQLite tracking store at the same moment (issue #13).

MLflow migrates a fresh store's schema on first open; two processes doing it at once race
(one dies with ``duplicate column name: step``). ``tuning.tracking.client`` serialises the
first open with a file lock. Here three processes wait at a barrier (a file), then open the
same fresh store at once and create a run each. Each process has imported MLflow before it
says it is ready (a file), and the test opens the barrier once all three are ready: the opens
race however slow the machine is, and nobody waits longer than the imports take.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

OPEN = """
import os, sys, time
import mlflow.store.tracking.sqlalchemy_store  # the heavy imports, before the barrier
from mlflow.tracking import MlflowClient
from tuning.tracking import client, experiment_id
ready, go = sys.argv[2], sys.argv[3]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
cl = client(sys.argv[1])
run = cl.create_run(experiment_id(cl, "race"))
print(run.info.run_id)
"""


def wait_until_ready(procs: list[subprocess.Popen[str]], ready: list[Path],
                     timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not all(r.exists() for r in ready):
        failed = [p for p in procs if p.poll() is not None]
        if failed:
            raise AssertionError(f"a process ended before the barrier: {failed[0].stderr.read()}")
        if time.time() > deadline:
            raise AssertionError("the processes did not reach the barrier")
        time.sleep(0.05)


@pytest.mark.slow
def test_processes_opening_a_fresh_store_at_once_all_succeed(tmp_path: Path) -> None:
    for attempt in range(2):
        uri = f"sqlite:///{tmp_path / f'mlflow-{attempt}.db'}"
        go = tmp_path / f"go-{attempt}"
        ready = [tmp_path / f"ready-{attempt}-{i}" for i in range(3)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs = [subprocess.Popen([sys.executable, "-c", OPEN, uri, str(r), str(go)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in ready]
        wait_until_ready(procs, ready)  # every process has imported MLflow, waits at the barrier
        go.touch()
        results = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [err[-800:] for _, err in results]
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("race")
        runs = MlflowClient(tracking_uri=uri).search_runs([exp.experiment_id])
        assert len(runs) == 3
