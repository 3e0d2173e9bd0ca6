"""`rungwise submit` and `rungwise jobs`: fast checks of what is shipped, then a real Ray head.

The slow tests (marked slow and ray) share a module fixture that starts its own head
(`ray start --head --block`) on free ports of 127.0.0.1, with its own --temp-dir and its own
HOME, whose ~/.ray/auth_token turns token authentication on, as on a user's machine. The CLI
runs in subprocesses with that HOME and no RAY_AUTH_* variables: the token file is all it has.
Teardown stops only this head: the `ray start --block` process shuts down what it started, then
anything left whose command line or working directory lies in the head's temp dir is killed
(`ray stop` would also kill the session's other Ray instance).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.cli import UserError
from jobs.cluster import auth_headers, resolve_address
from jobs.submit import SubmitRequest, entrypoint, is_local_uri
from jobs.upload import collect, excludes_for, project_root
from tests.conftest import sqlite_store

ROOT = Path(__file__).resolve().parents[2]
SPEC = "tests/jobs/tiny_adult.yaml"
EXPERIMENT = "rungwise-submit-test"
VENV_BIN = Path(sys.executable).parent
OUTPUTS: list[str] = []  # every CLI output, checked for the token


# --- fast: what is shipped, how the cluster is addressed ------------------------------------


@pytest.mark.parametrize(("uri", "local"), [
    (None, True), ("mlflow.db", True), ("/abs/mlruns", True), ("file:///tmp/mlruns", True),
    ("sqlite:///mlflow.db", True), ("SQLITE:////abs/mlflow.db", True),
    ("http://mlflow:5000", False), ("https://mlflow.example.com", False),
    ("databricks", False), ("postgresql://u@db/mlflow", False)])
def test_is_local_uri(uri: str | None, local: bool) -> None:
    assert is_local_uri(uri) is local


def test_entrypoint_quotes_overrides_and_names_the_spec_relative() -> None:
    req = SubmitRequest(spec="x.yaml", command="tune", overrides=["model.hidden=[64, 32]"],
                        python="/opt/py env/bin/python", args=["--no-register"])
    assert entrypoint(req, Path("examples/adult.yaml")) == (
        "'/opt/py env/bin/python' -m jobs tune examples/adult.yaml "
        "--set 'model.hidden=[64, 32]' --no-register")


def test_excludes_keep_the_spec_itself() -> None:
    assert "tests" in excludes_for(Path("examples/adult.yaml"))
    kept = excludes_for(Path("tests/jobs/tiny_adult.yaml"))
    assert "tests" not in kept and ".venv" in kept


def test_project_root_and_collect(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "a.yaml").write_bytes(b"x" * 100)
    for junk in (".venv/lib/big.bin", "mlruns/0/m", "build/out.bin", "pkg/__pycache__/m.pyc"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_bytes(b"y" * 10_000)
    (tmp_path / ".gitignore").write_text("build/\n")
    assert project_root(tmp_path / "specs" / "a.yaml") == tmp_path
    upload = collect(tmp_path, excludes_for(Path("specs/a.yaml")))
    assert list(upload.files) == [".gitignore", "pyproject.toml", "specs/a.yaml"]
    (tmp_path / "pyproject.toml").unlink()
    with pytest.raises(UserError, match="no pyproject.toml.*--working-dir"):
        project_root(tmp_path / "specs" / "a.yaml")
    assert project_root(tmp_path / "specs" / "a.yaml", str(tmp_path)) == tmp_path


def test_resolve_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match="--address http://HEAD:8265 or set RAY_ADDRESS"):
        resolve_address(None)
    assert resolve_address("10.0.0.5:8265/") == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.com")
    assert resolve_address(None) == "https://ray.example.com"
    with pytest.raises(UserError, match="dashboard URL"):
        resolve_address("ray://head:10001")


def test_auth_headers_follow_rays_token_sources(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        assert auth_headers() == {}  # no token anywhere: nothing sent
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("from-the-file\n")
        assert auth_headers() == {"authorization": "Bearer from-the-file"}
        monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-env")
        assert auth_headers() == {"authorization": "Bearer from-the-env"}
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        assert auth_headers() == {}
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
        with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH=.*cannot be read"):
            auth_headers()
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
        (tmp_path / ".ray" / "auth_token").unlink()
        with pytest.raises(UserError, match="RAY_AUTH_MODE=token but no Ray token"):
            auth_headers()
    finally:
        monkeypatch.undo()
        from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

        AuthenticationTokenLoader.instance().reset_cache()  # the real sources again


# --- slow: a real head --------------------------------------------------------------------


@dataclass
class Head:
    address: str
    env: dict[str, str]
    token: str
    temp_dir: Path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _worker_ports() -> tuple[int, int]:
    """A block of 200 worker ports away from Ray's default 10002-19999 and ephemeral ports."""
    base = 20000 + 200 * secrets.randbelow(50)
    return base, base + 199


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["HOME"] = str(home)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _head_command(temp_dir: Path) -> tuple[list[str], str]:
    gcs, dash, client, nm, om, agent, agent_grpc, rt_agent, metrics = _free_ports(9)
    low, high = _worker_ports()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--node-manager-port", str(nm),
           "--object-manager-port", str(om), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port",
           str(rt_agent), "--metrics-export-port", str(metrics), "--min-worker-port", str(low),
           "--max-worker-port", str(high), "--num-cpus", "2", "--disable-usage-stats",
           "--temp-dir", str(temp_dir / "ray")]
    return cmd, f"http://127.0.0.1:{dash}"


def _wait_job_server(address: str, token: str, proc: subprocess.Popen[bytes], log: Path,
                     timeout: float = 180) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {log.read_text()[-3000:]}")
        try:
            r = requests.get(f"{address}/api/jobs/", timeout=5,
                             headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 200 and "Ray runtime started" in log.read_text():
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"the job server at {address} did not answer: {log.read_text()[-3000:]}")


def _pids_under(temp_dir: Path) -> list[int]:
    """Processes whose command line or working directory lies in temp_dir."""
    mark, pids = str(temp_dir), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if mark in cmdline or cwd.startswith(mark):
            pids.append(int(entry.name))
    return pids


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _stop_head(proc: subprocess.Popen[bytes], temp_dir: Path) -> None:
    if proc.poll() is not None:  # shown with a failing test: who took the head down?
        print(f"the test head exited early ({proc.returncode}):\n"
              f"{(temp_dir / 'ray-start.log').read_text()[-3000:]}")
    stop_processes([proc], temp_dir)


def stop_processes(procs: list[subprocess.Popen[bytes]], temp_dir: Path) -> None:
    """SIGTERM ``procs`` (SIGKILL after 30 s), then whatever still runs from ``temp_dir``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    _signal(_pids_under(temp_dir), signal.SIGTERM)
    deadline = time.time() + 10
    while _pids_under(temp_dir) and time.time() < deadline:
        time.sleep(0.5)
    _signal(_pids_under(temp_dir), signal.SIGKILL)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    temp_dir = Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))  # short: socket paths <= 107
    home = temp_dir / "home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    token_file = home / ".ray" / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    cmd, address = _head_command(temp_dir)
    log = temp_dir / "ray-start.log"
    env = _env(home)
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    try:
        _wait_job_server(address, token, proc, log)
        yield Head(address=address, env=env, token=token, temp_dir=temp_dir)
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def rungwise(head: Head, *args: str, env: dict[str, str] | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "jobs", *args], cwd=ROOT, text=True,
                         env=env or head.env, capture_output=True, timeout=timeout)
    OUTPUTS.append(out.stdout + out.stderr)
    assert head.token not in out.stdout + out.stderr
    return out


def _job_id(out: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("submitted: ")]
    assert len(lines) == 1, out.stdout + out.stderr
    return lines[0].removeprefix("submitted: ").strip()


def _job_ids(head: Head) -> set[str]:
    out = rungwise(head, "jobs", "list", "--address", head.address)
    assert out.returncode == 0, out.stderr
    return {ln.split()[0] for ln in out.stdout.splitlines()[1:] if ln.strip()}


def _one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rungwise: error: "), out.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")


def _runs(uri: str) -> list[object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"no experiment {EXPERIMENT} in {uri}"
    return list(client.search_runs([exp.experiment_id]))


# --- (a) submissions that run --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_cluster_enforces_the_token(head: Head) -> None:
    import requests

    assert requests.get(f"{head.address}/api/version", timeout=10).status_code == 401
    env = {**head.env, "RAY_AUTH_MODE": "disabled"}  # no token sent -> refused, one line
    _one_line_error(rungwise(head, "jobs", "list", "--address", head.address, env=env),
                    "requires a token", head.address)
    env = {**head.env, "RAY_AUTH_TOKEN": "not-the-token"}
    _one_line_error(rungwise(head, "jobs", "list", "--address", head.address, env=env),
                    "refused this machine's token")


@pytest.mark.slow
@pytest.mark.ray
def test_submit_inspect_then_logs_status_list(head: Head) -> None:
    out = rungwise(head, "submit", SPEC, "--address", head.address, "--command", "inspect")
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = _job_id(out)
    assert job_id.startswith("rungwise-rungwise-submit-test-inspect-")
    assert f"jobs logs {job_id} --follow" in out.stderr
    logs = rungwise(head, "jobs", "logs", job_id, "--follow", "--address", head.address)
    assert logs.returncode == 0, logs.stdout + logs.stderr
    assert "rows train/val/test: 22793/4884/4884" in logs.stdout
    assert logs.stdout.rstrip().endswith("status: SUCCEEDED")
    status = rungwise(head, "jobs", "status", job_id, "--address", head.address)
    assert status.returncode == 0 and f"{job_id}  SUCCEEDED" in status.stdout
    plain = rungwise(head, "jobs", "logs", job_id, "--address", head.address)
    assert "fingerprint:" in plain.stdout
    listing = rungwise(head, "jobs", "list", "--address", head.address)
    row = next(ln for ln in listing.stdout.splitlines() if ln.startswith(job_id))
    assert "SUCCEEDED" in row and "-m jobs inspect tests/jobs/tiny_adult.yaml" in row


@pytest.mark.slow
@pytest.mark.ray
def test_submit_with_ray_address_env_and_stop(head: Head) -> None:
    env = {**head.env, "RAY_ADDRESS": head.address}
    out = rungwise(head, "submit", SPEC, "--command", "inspect", "--no-wait", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = _job_id(out)
    assert "status:" not in out.stdout  # --no-wait: back right after submitting
    stop = rungwise(head, "jobs", "stop", job_id, env=env)
    assert stop.returncode == 0, stop.stderr
    deadline = time.time() + 120
    while time.time() < deadline:
        status = rungwise(head, "jobs", "status", job_id, env=env).stdout
        if any(s in status for s in ("STOPPED", "SUCCEEDED", "FAILED")):
            break
        time.sleep(1)
    assert "STOPPED" in status or "SUCCEEDED" in status  # it may finish before the stop lands


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("command", ["train", "tune"])
def test_submit_runs_and_tracks(head: Head, command: str, tmp_path: Path) -> None:
    _needs(f"jobs.{command}")
    uri = sqlite_store(tmp_path)
    out = rungwise(head, "submit", SPEC, "--address", head.address, "--command", command,
                   "--set", f"tracking.uri={uri}", "--allow-local-tracking", "--follow")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.rstrip().endswith("status: SUCCEEDED")
    runs = _runs(uri)
    assert all(r.info.status == "FINISHED" for r in runs)  # type: ignore[attr-defined]
    assert len(runs) == (1 if command == "train" else 3)  # tune: parent + 2 trials


@pytest.mark.slow
@pytest.mark.ray
def test_the_cluster_gets_exactly_the_dry_run_listing(head: Head, tmp_path: Path) -> None:
    """A project full of secrets and links out (test_submit_secrets.py) submitted for real: the
    job (the project's own `python -m jobs`) lists the files it was given, with their hashes."""
    import hashlib

    from tests.jobs.test_submit_secrets import EXPECTED, MARK, listed, make_project

    proj = make_project(tmp_path)
    spec = str(proj / "specs" / "job.yaml")
    dry = rungwise(head, "submit", spec, "--command", "inspect", "--dry-run",
                   "--address", head.address)
    assert dry.returncode == 0 and listed(dry.stdout) == sorted(EXPECTED), dry.stderr
    out = rungwise(head, "submit", spec, "--address", head.address, "--command", "inspect",
                   "--follow")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = dict(ln.split()[1:3] for ln in out.stdout.splitlines() if ln.startswith("FILE "))
    assert sorted(got) == sorted(EXPECTED)
    assert got == {n: hashlib.sha256((proj / n).read_bytes()).hexdigest() for n in EXPECTED}
    assert MARK not in out.stdout + out.stderr


# --- (b)-(e) refusals and errors -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_local_tracking_and_bad_spec_are_refused_before_submitting(head: Head) -> None:
    before = _job_ids(head)
    out = rungwise(head, "submit", SPEC, "--address", head.address, "--command", "train")
    _one_line_error(out, "tracking.uri", "--allow-local-tracking", "http")
    env = {**head.env, "MLFLOW_TRACKING_URI": "file:///tmp/mlruns"}
    _one_line_error(rungwise(head, "submit", SPEC, "--address", head.address, env=env),
                    "file:///tmp/mlruns")
    out = rungwise(head, "submit", SPEC, "--address", head.address, "--allow-local-tracking",
                   "--set", "train.epochs=0")
    _one_line_error(out, "train.epochs")
    assert "submitted" not in out.stdout
    assert _job_ids(head) == before


@pytest.mark.slow
@pytest.mark.ray
def test_unreachable_address(head: Head) -> None:
    (port,) = _free_ports(1)
    address = f"http://127.0.0.1:{port}"
    _one_line_error(rungwise(head, "jobs", "list", "--address", address), address)
    out = rungwise(head, "submit", SPEC, "--address", address, "--allow-local-tracking")
    _one_line_error(out, address)
    _one_line_error(rungwise(head, "jobs", "list"), "--address", "RAY_ADDRESS")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("action", ["status", "logs", "stop"])
def test_unknown_job_id(head: Head, action: str) -> None:
    out = rungwise(head, "jobs", action, "raysubmit_nosuchjob", "--address", head.address)
    _one_line_error(out, "raysubmit_nosuchjob", "jobs list")


@pytest.mark.slow
@pytest.mark.ray
def test_token_never_printed(head: Head) -> None:
    token = (Path(head.env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    debug = rungwise(head, "--debug", "jobs", "status", "nosuchjob", "--address", head.address)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert len(OUTPUTS) > 5
    assert not [o for o in OUTPUTS if token in o]
    users = Path(os.path.expanduser("~")) / ".ray" / "auth_token"  # this machine's, if any
    if users.is_file() and users.read_text().strip():
        assert not [o for o in OUTPUTS if users.read_text().strip() in o]
