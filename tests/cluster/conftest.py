"""A two-node Ray cluster on one machine whose worker cannot see the head's files, and an
S3-compatible server (moto) both nodes reach.

* head: ``ray start --head --num-cpus 0`` (no trial can run there), its own --temp-dir, its own
  HOME whose ~/.ray/auth_token turns token authentication on (as Ray 2.59+ does for a user);
* worker: ``unshare -m`` then a tmpfs mounted over the cluster's ``work/`` folder before
  ``ray start --address``: the worker's processes see an empty ``work/``, so anything the
  driver keeps there (a local storage folder, the MLflow store) is invisible to them, as on a
  second machine. Needs root (CAP_SYS_ADMIN); skipped with the reason otherwise;
* ``moto_server`` on 127.0.0.1 with a bucket; AWS_ENDPOINT_URL and the AWS_* variables are set
  for both nodes before ``ray start`` and for the driver.

Every port is chosen free, so other Ray instances on the machine are untouched; teardown stops
only processes whose command line or working directory lies in this cluster's temp dir (never
``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.jobs.test_submit import (
    _free_ports,
    _wait_job_server,
    _worker_ports,
    stop_processes,
)

VENV_BIN = Path(sys.executable).parent
GATE_PLUGIN = ROOT / "tests" / "reliability" / "gate"
BUCKET = "rungwise-test"
WORKER_CPUS = 2


@dataclass
class Cluster:
    address: str
    """GCS address for ``--address``."""
    dashboard: str
    env: dict[str, str]
    """For the driver: HOME with the token, AWS_* pointing at moto, PYTHONPATH."""
    temp_dir: Path
    work: Path
    """Visible to the head and the driver only: the worker node sees an empty tmpfs here."""
    s3_endpoint: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def gate(self) -> Path:
        """Create this folder to hold every trial after the first (see the gate plugin)."""
        return self.temp_dir / "gate"

    def bucket_uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def s3(self) -> object:
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.s3_endpoint, access_key="testing",
                                 secret_key="testing", region="us-east-1",
                                 allow_bucket_creation=True)

    def add_worker(self, name: str, cpus: int = WORKER_CPUS) -> subprocess.Popen[bytes]:
        """Another worker node in its own mount namespace; waits until Ray sees it alive (a
        node id it did not know before: a node killed just now may still count as alive for a
        while, so a count of alive nodes would not tell)."""
        known = {str(n["id"]) for n in alive_nodes(self)}
        for _ in range(10):  # an empty answer is a failed listing (the head is always there)
            if known:
                break
            time.sleep(2)
            known = {str(n["id"]) for n in alive_nodes(self)}
        assert known, "the cluster's nodes could not be listed"
        proc = _start_worker(self, name, cpus)
        self.procs.append(proc)
        _wait_nodes(self, known, proc, self.temp_dir / f"{name}.log")
        return proc


ANSWER = "RUNGWISE-ANSWER "


def ask_cluster(cluster: Cluster, expression: str, timeout: float = 120,
                check: bool = False) -> object:
    """The JSON value of ``expression``, evaluated in a subprocess connected to the cluster
    (the test process has no Ray), or None if that process failed (and ``check`` is false).
    Read from the one stdout line that starts with ``ANSWER``: Ray may print warnings there
    too (seen under load: "raylet has lagging heartbeats")."""
    import json

    code = ("import json, ray; ray.init(address=" + repr(cluster.address) + ", "
            "log_to_driver=False, logging_level='ERROR'); print(" + repr(ANSWER)
            + " + json.dumps(" + expression + "), flush=True)")
    out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True,
                         text=True, timeout=timeout)
    lines = [x for x in out.stdout.splitlines() if x.startswith(ANSWER)]
    if out.returncode != 0 or not lines:
        assert not check, out.stdout[-2000:] + out.stderr[-3000:]
        return None
    return json.loads(lines[-1][len(ANSWER):])


def alive_nodes(cluster: Cluster) -> list[dict[str, object]]:
    """The cluster's alive nodes (an empty list if they could not be listed)."""
    nodes = ask_cluster(cluster, "[{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} "
                                 "for n in ray.nodes() if n['Alive']]")
    return list(nodes) if isinstance(nodes, list) else []


def _wait_nodes(cluster: Cluster, known: set[str], proc: subprocess.Popen[bytes], log: Path,
                timeout: float = 180) -> None:
    """Until an alive node that is not in ``known`` appears."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker node exited ({proc.returncode}): "
                               f"{log.read_text()[-3000:]}")
        if {str(n["id"]) for n in alive_nodes(cluster)} - known:
            return
        time.sleep(2)
    raise RuntimeError(f"the worker node did not join: {log.read_text()[-3000:]}")


def _node_ports() -> list[str]:
    nm, om, agent, agent_grpc, rt_agent, metrics = _free_ports(6)
    low, high = _worker_ports()
    return ["--node-manager-port", str(nm), "--object-manager-port", str(om),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port",
            str(agent_grpc), "--runtime-env-agent-port", str(rt_agent),
            "--metrics-export-port", str(metrics), "--min-worker-port", str(low),
            "--max-worker-port", str(high), "--node-ip-address", "127.0.0.1",
            "--disable-usage-stats"]


def _start_worker(cluster: Cluster, name: str, cpus: int) -> subprocess.Popen[bytes]:
    ray_cmd = [str(VENV_BIN / "ray"), "start", "--address", cluster.address, "--block",
               "--num-cpus", str(cpus), "--num-gpus", "0", *_node_ports(),
               # its own temp dir: a node that shared the head's would garbage-collect the
               # job's working_dir from under the job's driver (one machine, one folder)
               "--temp-dir", str(cluster.temp_dir / name)]
    script = (f"mount -t tmpfs tmpfs {cluster.work} && exec "
              + " ".join(f"'{a}'" for a in ray_cmd))
    log = cluster.temp_dir / f"{name}.log"
    # the worker's trials load the test gate plugin (tests/reliability/gate), armed by a test
    # that creates cluster.gate (outside work/, so the worker node sees it)
    env = {**cluster.env, "PYTHONPATH": f"{GATE_PLUGIN}{os.pathsep}{ROOT}",
           "RUNGWISE_TEST_GATE": str(cluster.gate)}
    return subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=env,
                            cwd=cluster.temp_dir, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)


def _can_unshare(probe: Path) -> str | None:
    probe.mkdir(exist_ok=True)
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    out = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {probe}"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return f"unshare -m + mount is not permitted here: {out.stderr.strip()[:200]}"
    return None


def _start_moto(temp_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    (port,) = _free_ports(1)
    log = temp_dir / "moto.log"
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=temp_dir)
    endpoint = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
                return proc, endpoint
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.5)
    raise RuntimeError(f"moto_server did not answer on {endpoint}")


def _env(home: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "AWS_")) and k not in ("RAY_ADDRESS",
                                                                  "MLFLOW_TRACKING_URI",
                                                                  "RUNGWISE_STORAGE")}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", AWS_ENDPOINT_URL=endpoint,
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               RAY_AIR_NEW_OUTPUT="0", PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token")
    return env


def _start_head(temp_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str,
                                                               str]:
    gcs, dash, client = _free_ports(3)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--num-cpus", "0", "--num-gpus", "0",
           "--temp-dir", str(temp_dir / "ray"), *_node_ports()]
    log = temp_dir / "head.log"
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"


stop_all = stop_processes  # the cluster's processes, then whatever runs from its temp dir


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]
    """AWS_* variables pointing at the server (test credentials)."""

    def fs(self) -> object:
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, access_key="testing",
                                 secret_key="testing", region="us-east-1",
                                 allow_bucket_creation=True)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3]:
    """moto's S3 server on a free port of 127.0.0.1 with the bucket BUCKET."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rwm-", dir="/tmp"))
    proc, endpoint = _start_moto(temp_dir)
    try:
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        s3 = S3(endpoint, env)
        s3.fs().create_dir(BUCKET)  # type: ignore[attr-defined]
        yield s3
    finally:
        stop_all([proc], temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(moto_s3: S3) -> Iterator[Cluster]:
    temp_dir = Path(tempfile.mkdtemp(prefix="rwc-", dir="/tmp"))  # short: socket paths
    work = temp_dir / "work"
    work.mkdir()
    reason = _can_unshare(temp_dir / "probe")
    if reason:
        shutil.rmtree(temp_dir, ignore_errors=True)
        pytest.skip(f"two-node cluster: {reason} (the worker node needs its own mount "
                    "namespace; run as root or with CAP_SYS_ADMIN)")
    home = temp_dir / "home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(token)
    (home / ".ray" / "auth_token").chmod(0o600)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        endpoint = moto_s3.endpoint
        env = _env(home, endpoint)
        head, address, dashboard = _start_head(temp_dir, env)
        procs.append(head)
        _wait_job_server(dashboard, token, head, temp_dir / "head.log")
        c = Cluster(address, dashboard, env, temp_dir, work, endpoint, procs)
        c.add_worker("worker-1")
        yield c
    finally:
        stop_all(list(reversed(procs)), temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_s3(cluster: Cluster) -> Iterator[str]:
    """``mlflow server`` on the head's side: runs in SQLite there, artifacts in the bucket
    (``--artifacts-destination s3://... --serve-artifacts``: clients never need S3 access)."""
    from tests.conftest import _wait_http, sqlite_store

    root = cluster.temp_dir / "mlflow-server"
    store = sqlite_store(root)  # already migrated
    (port,) = _free_ports(1)
    log = root / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", store, "--serve-artifacts",
         "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--workers", "1"],
        env=cluster.env, cwd=root, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/health", proc, log)
        yield url
    finally:
        stop_all([proc], root)
