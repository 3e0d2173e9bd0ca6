"""Shared fixtures: one real local Ray instance per session, real MLflow stores."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA = ROOT / "data"

# Trials are small: one torch thread each keeps two trials from fighting over two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def write_file(tmp_path: Path, text: str | bytes, name: str) -> Path:
    """Write ``text`` (str or bytes) to ``tmp_path / name``."""
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (``ray.init`` takes 10-15 s here)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                           "PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


_MIGRATE = """
import sys
from mlflow.tracking import MlflowClient
cl = MlflowClient(tracking_uri="sqlite:///" + sys.argv[1])
cl.search_experiments(max_results=1)
cl.search_registered_models(max_results=1)
"""


@functools.cache
def _migrated_template() -> Path:
    """An empty SQLite tracking store with MLflow's full schema, made once per session in a
    subprocess (so no connection to it stays open here). Migrating a fresh store takes 3-6 s
    of CPU here; copying this file takes milliseconds."""
    folder = Path(tempfile.mkdtemp(prefix="rw-store-"))
    atexit.register(shutil.rmtree, folder, True)
    db = folder / "template.db"
    subprocess.run([sys.executable, "-c", _MIGRATE, str(db)], cwd=folder, check=True,
                   capture_output=True, timeout=300)
    return db


def sqlite_store(folder: Path, name: str = "mlflow.db") -> str:
    """A fresh, empty SQLite tracking store ``folder / name`` (absolute URI), already migrated:
    a copy of one template (see ``_migrated_template``). Its Default experiment's artifact
    location is set to ``folder/mlruns/0``, as if MLflow had created it from ``folder``.
    Tests of a store's first open (the migration itself) use a plain path instead."""
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / name
    shutil.copyfile(_migrated_template(), db)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (str(folder / "mlruns" / "0"),))
    return f"sqlite:///{db}"


@pytest.fixture()
def mlflow_uri(tmp_path: Path) -> str:
    """A fresh SQLite tracking store (absolute URI) per test, already migrated."""
    return sqlite_store(tmp_path)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on a free port of 127.0.0.1, for the HTTP path."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", sqlite_store(root),
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/health", proc, root / "server.log")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer on {url}")


HEAVY_FIRST = (
    "tests/cluster/", "tests/tuning/test_ddp_resume.py", "tests/tuning/test_sweep.py",
    "tests/test_artifact_attacks.py", "tests/reliability/test_signals.py",
    "tests/jobs/test_submit.py", "tests/tuning/test_packed_sweep.py",
    "tests/reliability/test_mlflow_outage.py", "tests/reliability/test_faults.py",
    "tests/jobs/test_retrain.py", "tests/tuning/test_localray.py", "tests/jobs/test_cli_train.py",
    "tests/tuning/test_autoscale.py", "tests/test_security.py", "tests/tuning/test_run_logger.py",
    "tests/badinput/test_corpus.py", "tests/tuning/test_explain.py",
    "tests/tuning/test_portable_model.py", "tests/tuning/test_store_open.py",
    "tests/jobs/test_drift.py", "tests/jobs/test_predict.py", "tests/trainer/test_loop.py",
)
"""Modules that take 15 s or more here (test time summed per module from a junit report of
``make test``, 2026-12-01), longest first: ``make test`` hands them out first, so that the last
module to start is a short one."""


def _group_of(nodeid: str) -> str:
    """The unit a worker runs whole: a module (its module-scoped fixtures, e.g. a sweep shared
    by several checks, are built once, in one process), or all of ``tests/cluster/`` (one
    two-node cluster, its tests in file order)."""
    path = nodeid.split("::", 1)[0]
    return "tests/cluster/" if path.startswith("tests/cluster/") else path


def _group(item: pytest.Item) -> str:
    return _group_of(Path(str(item.fspath)).relative_to(ROOT).as_posix())


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` (``make test``; also plain ``-n N``) hands out ``_group_of``
    units. pytest-xdist 3.8's own loadgroup does not group under pytest 9.2: it renames
    ``item._nodeid``, which pytest 9.2 no longer reads (seen: a module's tests on both
    workers), so rungwise brings its own, through xdist's documented scheduler hook."""
    if config.getvalue("dist") not in ("load", "loadgroup"):  # load: plain ``pytest -n N``
        return None
    # hand the groups out in collection order (HEAVY_FIRST), not by number of tests (xdist's
    # default for scope scheduling, which put 3-test modules of minutes last)
    config.option.loadscopereorder = False
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group_of(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heavy groups first (``HEAVY_FIRST``); xdist's scheduler hands out groups in this
    order. Without -n this only reorders."""

    def rank(item: pytest.Item) -> int:
        group = _group(item)
        return next((i for i, p in enumerate(HEAVY_FIRST) if group.startswith(p)),
                    len(HEAVY_FIRST))

    items.sort(key=rank)  # stable: file order within a module, modules in file order otherwise
