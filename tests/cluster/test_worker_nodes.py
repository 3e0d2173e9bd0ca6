"""Worker nodes coming and going on the split cluster (see conftest.py); runs after
test_two_nodes.py (file order), since it changes the cluster's nodes.

* a multi-worker (DDP) trial whose two ranks sit on two different nodes (``resources.placement:
  spread``) under ASHA, with more such trials than fit at once: every trial ends, the
  placement groups of stopped trials are given back (ray#54305 workaround) across nodes;
* a worker node lost mid-sweep (every process of it SIGKILLed, as when a spot VM or a pod
  goes away) and a fresh node joining: the sweep finishes without a hand, the interrupted
  trials resume from their last checkpoint in the bucket, each epoch is in MLflow once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.cluster.conftest import Cluster, alive_nodes, ask_cluster
from tests.cluster.test_two_nodes import (
    NUM_SAMPLES,
    checkpointed_trials,
    children,
    runs,
    write_spec,
)
from tests.conftest import sqlite_store

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def reserved_groups(cluster: Cluster) -> int:
    count = ask_cluster(cluster, "sum(1 for i in ray.util.placement_group_table().values() "
                                 "if i['state'] == 'CREATED')", check=True)
    assert isinstance(count, int)
    return count


def test_ddp_ranks_on_two_nodes_under_asha(cluster: Cluster) -> None:
    if len([n for n in alive_nodes(cluster) if n["cpus"]]) < 2:
        cluster.add_worker("worker-2")
    folder = cluster.work / "e"
    uri = sqlite_store(folder)
    spec = write_spec(folder, uri, epochs=4, concurrent=2)
    out = subprocess.run(
        [sys.executable, "-m", "jobs", "tune", str(spec), "--address", cluster.address,
         "--set", f"tune.storage={cluster.bucket_uri('e')}", "--set", "tune.search=asha",
         "--set", "tune.grace_period=1", "--set", "tune.reduction_factor=2",
         # in this order (grid): a good trial first, so ASHA's rungs stop the poor ones
         "--set", "tune.space={train.lr: {grid: [0.003, 0.00001, 0.00001]}}",
         "--set", "tune.num_samples=1",
         "--set", "train.optimizer=sgd", "--set", "train.momentum=0.0",
         "--set", "resources.workers_per_trial=2", "--set", "resources.placement=spread",
         "--no-register"],
        cwd=folder, env=cluster.env, text=True, capture_output=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    kids = children(uri)  # three trials, two at once: the third waits for a group
    assert len(kids) == 3 and {k.info.status for k in kids} == {"FINISHED"}
    assert {k.data.tags.get("rungwise.nodes") for k in kids} == {"2"}  # ranks on 2 nodes
    statuses = [k.data.tags["rungwise.status"] for k in kids]
    assert "stopped_by_scheduler" in statuses, statuses
    deadline = time.time() + 120  # Ray removes a group asynchronously: wait for the event
    while reserved_groups(cluster) and time.time() < deadline:
        time.sleep(1)
    assert reserved_groups(cluster) == 0  # no group left reserved, on either node


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant, from /proc (parent ids)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return tree


def kill_node(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL a worker node's whole process tree (raylet, its workers, the agents) at once."""
    victims = process_tree(proc.pid)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)
    return len(victims)


def epochs_in_mlflow(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "val_loss"))


def wait_for_epochs(proc: subprocess.Popen[str], uri: str, log: Path, epochs: int,
                    timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before the node was lost "
                                 f"(rc {proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            done = [len(epochs_in_mlflow(uri, k.info.run_id)) for k in children(uri)]
        except Exception:  # the store is being created
            done = []
        if done and max(done) >= epochs:
            return
        time.sleep(2)  # the driver writes the same SQLite store: do not crowd it
    raise AssertionError(f"no trial reached epoch {epochs} in time")


def test_a_lost_worker_node_and_a_fresh_one_joining(cluster: Cluster) -> None:
    workers = [p for p in cluster.procs[1:] if p.poll() is None]
    assert workers, "the fixture's worker node is not running"
    folder = cluster.work / "f"
    uri = sqlite_store(folder)
    spec = write_spec(folder, uri, epochs=8, concurrent=2)
    log = folder / "sweep.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs", "tune", str(spec), "--address", cluster.address,
             # 6, not 3: a trial that Tune placed on a node that had just died fails while its
             # actor is created, and each such try counts (seen once in CI: a trial given up
             # after 4 tries, none of which started); the interrupted trials need one each
             "--set", f"tune.storage={cluster.bucket_uri('f')}", "--set", "tune.max_failures=6",
             "--set", "train.batch_size=256", "--no-register"],
            cwd=folder, env=cluster.env, text=True, stdout=err, stderr=subprocess.STDOUT)
        try:
            wait_for_epochs(proc, uri, log, epochs=3)
            killed = sum(kill_node(p) for p in workers)  # every worker node goes away
            assert killed > 1
            cluster.procs[:] = [p for p in cluster.procs if p not in workers]
            cluster.add_worker("worker-fresh")  # a new node, as an autoscaler would add
            proc.wait(timeout=1200)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, log.read_text()[-5000:]
    kids = children(uri)
    assert len(kids) == NUM_SAMPLES, (
        f"{[(k.info.run_name, k.info.status) for k in kids]}\n{log.read_text()[-6000:]}")
    assert {k.info.status for k in kids} == {"FINISHED"}
    assert [r for r in runs(uri) if r.info.status == "RUNNING"] == []
    for kid in kids:  # every epoch once: the restarted trials went on from their checkpoint
        assert epochs_in_mlflow(uri, kid.info.run_id) == list(range(1, 9)), kid.info.run_name
    from tests.cluster.test_two_nodes import bucket_files

    files = bucket_files(cluster, "f/rw-cluster")
    assert len(checkpointed_trials(files)) == NUM_SAMPLES
    assert sum(trial_failures(cluster, files).values()) >= 1  # trials were interrupted


def trial_failures(cluster: Cluster, files: list[str]) -> dict[str, int]:
    """Trial id -> how often Tune restarted it, from the experiment state in the bucket."""
    import json

    [state] = [f for f in files if "/experiment_state-" in f and f.endswith(".json")]
    doc = json.loads(cluster.s3().open_input_stream(state).read())  # type: ignore[attr-defined]
    out = {}
    for trial_json, meta_json in doc["trial_data"]:
        out[json.loads(trial_json)["trial_id"]] = int(json.loads(meta_json)["num_failures"])
    return out
