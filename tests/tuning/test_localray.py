"""A Ray that rungwise starts itself listens on 127.0.0.1 only: the listening sockets of the
real processes of a real sweep, read from /proc while `rungwise tune` runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, ROOT
from tests.listening import Listener, listeners, process_tree
from tuning.localray import loopback_node, starts_local_ray

linux_only = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")


@pytest.mark.parametrize(("address", "env", "local"), [
    (None, None, True), ("local", None, True), (None, "127.0.0.1:6379", False),
    ("auto", None, False), ("10.0.0.5:6379", None, False), ("ray://head:10001", None, False)])
def test_only_a_new_local_ray_is_put_on_loopback(
        monkeypatch: pytest.MonkeyPatch, address: str | None, env: str | None,
        local: bool) -> None:
    from ray._private import ray_constants

    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert starts_local_ray(address) is local
    before = ray_constants.ENABLE_RAY_CLUSTER
    with loopback_node(address):
        assert ray_constants.ENABLE_RAY_CLUSTER is (before and not local)
    assert ray_constants.ENABLE_RAY_CLUSTER is before  # ray start and joins are unaffected


def _sweep_listeners(tmp_path: Path, *overrides: str) -> tuple[set[Listener], str]:
    """Every socket that the `rungwise tune` process tree listened on while it ran."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "RUNGWISE_STORAGE": str(tmp_path / "runs")}
    env.pop("RAY_ADDRESS", None)
    sets = ["train.epochs=1", "train.early_stopping=null", "tune.search=random",
            "tune.num_samples=2", "tune.max_concurrent=1", "model.hidden=[16]",
            "tune.space={train.lr: {choice: [0.001, 0.01]}}", *overrides]
    cmd = [sys.executable, "-m", "jobs", "tune", str(EXAMPLES / "adult.yaml"), "--no-tracking",
           "--no-register", *[w for s in sets for w in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: set[Listener] = set()
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        seen |= listeners(process_tree(proc.pid))
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]
    return seen, out


def _table(found: set[Listener]) -> str:
    return "\n".join(sorted(map(str, found)))


@linux_only
@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_listens_on_loopback_only(tmp_path: Path) -> None:
    seen, _ = _sweep_listeners(tmp_path)
    names = {s.process for s in seen}
    # the listing saw Ray's own servers, so an empty answer below means something
    assert {"gcs_server", "raylet"} <= names, _table(seen)
    assert any(n.startswith("ray::") for n in names), _table(seen)
    wide = {s for s in seen if not s.ip.startswith("127.")}
    assert wide == set(), _table(wide)


@linux_only
@pytest.mark.slow
@pytest.mark.ray
def test_a_ddp_sweep_opens_only_torchs_rendezvous_store_on_every_interface(
        tmp_path: Path) -> None:
    """The one documented exception: rank 0 of a multi-worker trial runs torch.distributed's
    TCPStore, which ``init_process_group`` binds to every interface (torch has no setting for
    its address). Nothing else may appear: the test fails if something new does."""
    seen, _ = _sweep_listeners(tmp_path, "resources.workers_per_trial=2",
                               "tune.num_samples=1")
    names = {s.process.split(".")[0] for s in seen}
    assert {"gcs_server", "raylet", "ray::RayTrainWorker"} <= names, _table(seen)
    wide = {s for s in seen if not s.ip.startswith("127.")}
    ports = {(s.pid, s.port) for s in wide}
    assert len(ports) == 1, _table(wide)
    # the same rank-0 process, named by the task it runs when the socket is seen
    rank0 = ("ray::RayTrainWorker", "ray::execute._setup_torch_process_group")
    # one Ray worker process: its title changes with what it runs when a sighting is taken
    # (ray::IDLE before and after the actor, RayTrainWorker.<method>, or "?" when its cmdline
    # cannot be read for a moment); at least one sighting names it as rank 0
    (pid,) = {p for p, _ in ports}
    named = {s.process for s in seen if s.pid == pid and s.process != "?"}
    assert any(n.startswith(rank0) for n in named), _table(wide)
    assert all(n.startswith("ray::") for n in named), _table(wide)
    assert all(s.proto.startswith("tcp") and s.all_interfaces for s in wide), _table(wide)
