"""A cluster that grows: Ray's own fake autoscaler (``fake_multinode``) on this machine.

The head offers 0 CPU and 0 GPU, as on KubeRay and the cluster launcher; the one node type
the autoscaler can add has 2 CPU and 1 (fake) GPU, at most one such node. A sweep asking one
GPU per trial is queued, the autoscaler adds the node and the trials finish there; a trial
asking for more than any node type can give is refused with one line, exit 2.

The cluster is started with its own temp dir, ports and session; teardown ends only the
processes of that session (never ``ray stop``, which would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPEC = ROOT / "tests" / "jobs" / "tiny_adult.yaml"


def _config(gcs: str) -> dict[str, object]:
    return {
        "cluster_name": "rungwise-fake", "max_workers": 1, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0, "GPU": 0}, "node_config": {},
                                 "max_workers": 0},
            "gpu_node": {"resources": {"CPU": 2, "GPU": 1,
                                       "object_store_memory": 200 * 2**20},
                         "node_config": {}, "min_workers": 0, "max_workers": 1}},
        # what the wheel's missing example.yaml holds besides: unused by the fake provider
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": []}


def _own_pids(marker: str) -> list[int]:
    """Processes whose command line names this cluster's temp dir or GCS address."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return [p for p in pids if p != os.getpid()]


@pytest.fixture()
def growing_cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], Path]]:
    from ray._private.services import get_node_ip_address

    temp = Path(tempfile.mkdtemp(prefix="rw-as-"))  # unix socket paths must stay short
    gcs = f"{get_node_ip_address()}:{free_port()}"
    cfg = tmp_path / "autoscaling.json"
    cfg.write_text(json.dumps(_config(gcs)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "AUTOSCALER_METRIC_PORT": str(free_port()), "RAY_AUTH_MODE": "token",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "RUNGWISE_STORAGE": str(tmp_path / "runs")}
    ray_exe = str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [ray_exe, "start", "--head", f"--port={gcs.rsplit(':', 1)[1]}", "--num-cpus=0",
         "--num-gpus=0", f"--autoscaling-config={cfg}", f"--temp-dir={temp}",
         f"--object-store-memory={200 * 2**20}", "--include-dashboard=false",
         f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
         "--dashboard-agent-listen-port=0", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180)
    try:
        yield gcs, env, temp
    finally:
        for marker in (str(temp), gcs):
            for pid in _own_pids(marker):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 20
        while time.time() < deadline and _own_pids(str(temp)):
            time.sleep(0.5)
        for pid in _own_pids(str(temp)) + _own_pids(gcs):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in temp.glob("session_*/logs/monitor.*"):  # kept for a failed test's reader
            shutil.copy(log, tmp_path / log.name)
        shutil.rmtree(temp, ignore_errors=True)


def _tune(gcs: str, env: dict[str, str], *sets: str,
          timeout: float = 600) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "jobs", "tune", str(SPEC), "--address", gcs,
            "--no-tracking", "--no-register", "--set", "train.device=auto",
            "--set", "tune.num_samples=2", "--set", "tune.max_concurrent=1"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_sweep_waits_for_the_autoscaler_and_runs_on_the_node_it_adds(growing_cluster) -> None:
    gcs, env, temp = growing_cluster
    start = time.time()
    out = _tune(gcs, env, "resources.gpus_per_worker=1")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if "autoscaler" in ln]
    assert lines == ["rungwise: no node of the Ray cluster fits a trial now (one trial needs "
                     "1 CPU, 1 GPU); the trials wait for the autoscaler to add a node "
                     "(gpu_node)"], out.stderr[-3000:]
    assert len(re.findall(r"trial \w+ ended at epoch 1: val_loss=0\.\d+", out.stdout)) == 2, \
        out.stdout
    log = next(temp.glob("session_*/logs/monitor.log")).read_text()
    # the head has 0 CPU: the node the autoscaler added is the only place a trial could run
    assert "Adding 1 node(s) of type gpu_node" in log, log[-2000:]
    results = [json.loads(f.read_text().splitlines()[-1])
               for f in Path(env["RUNGWISE_STORAGE"]).rglob("result.json")]
    assert len(results) == 2 and {r["epoch"] for r in results} == {1}
    # the fake GPU has no CUDA behind it: device auto falls back to the CPU, in float32
    assert {r["precision"] for r in results} == {"fp32"}
    print(f"sweep on the grown cluster: {time.time() - start:.1f} s")

    # a trial no node type can ever hold: 2 workers x 1 GPU, at most one 1-GPU node
    # (the gpu_node it added is still up: it counts within the type's at most 1)
    refused = _tune(gcs, env, "resources.gpus_per_worker=1", "resources.workers_per_trial=2",
                    timeout=180)
    assert refused.returncode == 2, refused.stderr[-2000:]
    err = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("rungwise: error: resources: one trial needs 2 x "
                                                      "(1 CPU, 1 GPU), but the Ray cluster"), err
    assert "(gpu_node: 2 CPU, 1 GPU, at most 1)" in err[0], err
