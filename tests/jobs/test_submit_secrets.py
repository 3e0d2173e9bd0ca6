"""`rungwise submit` must not upload secrets nor send the Ray token in clear (issue #17).

Each test tries the attack for real: a project folder holding secrets, ignored files and
symlinks out of it; a recording HTTP server standing where the cluster would be. No Ray head is
started here (the upload's end-to-end check, on a real head, is in test_submit.py).
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.cli import UserError
from jobs.cluster import check_transport, is_loopback
from jobs.spec import load_spec
from jobs.submit import SubmitRequest, has_credentials, packaged, strip_credentials, tracking_env
from jobs.upload import collect, excludes_for

ROOT = Path(__file__).resolve().parents[2]
MARK = "S3CRET-7f1e2d"  # in every secret file, never in the code, the spec or the data
SECRET_FILES = {".env": f"AWS_SECRET_ACCESS_KEY={MARK}\n", ".netrc": f"password {MARK}\n",
                "id_rsa": f"-----BEGIN OPENSSH PRIVATE KEY-----{MARK}\n",
                ".aws/credentials": f"aws_secret_access_key={MARK}\n",
                "service-account.json": f'{{"private_key": "{MARK}"}}\n',
                "conf/db.env": f"PGPASSWORD={MARK}\n", "deploy/tls.key": f"{MARK}\n"}
IGNORED_FILES = {"notes/private.txt": f"{MARK}\n",  # by /.gitignore
                 "pkg/scratch/dump.txt": f"{MARK}\n",  # by pkg/.gitignore (relative to pkg/)
                 "big/blob.bin": f"{MARK}\n"}  # by .rayignore
SPEC = """name: secrets-test
data: {path: ../data/small.csv, target: y}
model: {hidden: [4]}
train: {epochs: 1}
"""
# the job on the cluster runs `python -m jobs ...` in the working_dir: this project's own
# `jobs` package (a regular one, so that it wins over rungwise's) answers, listing every file it
# was given with a hash of its bytes
LISTER = """import hashlib, os
for folder, _, files in os.walk("."):
    for f in files:
        p = os.path.join(folder, f)
        print("FILE", p[2:], hashlib.sha256(open(p, "rb").read()).hexdigest())
"""
EXPECTED = ["alias.py", "data/small.csv", "jobs/__init__.py", "jobs/__main__.py", "pkg/.gitignore",
            "pkg/model.py", "pyproject.toml", "specs/job.yaml", ".gitignore", ".rayignore"]


def make_project(base: Path) -> Path:
    """base/proj: code, spec, data, secrets, ignored files, links in and out; base/outside."""
    outside = base / "outside"
    (outside / ".ssh").mkdir(parents=True)
    (outside / "auth_token").write_text(f"ray-token-{MARK}\n")
    (outside / ".ssh" / "id_ed25519").write_text(f"{MARK}\n")
    proj = base / "proj"
    files = {"pyproject.toml": "[project]\nname = 'attack'\n", "specs/job.yaml": SPEC,
             "data/small.csv": "x,y\n1,0\n2,1\n", "pkg/model.py": "W = 1\n",
             "jobs/__init__.py": "", "jobs/__main__.py": LISTER, ".gitignore": "notes/\n",
             "pkg/.gitignore": "scratch/\n", ".rayignore": "big/\n",
             **SECRET_FILES, **IGNORED_FILES}
    for name, text in files.items():
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        (proj / name).write_text(text)
    (proj / "ray_token").symlink_to(outside / "auth_token")  # a file out of the project
    (proj / "data" / "home").symlink_to(outside)  # a folder out of it
    (proj / "innocent.txt").symlink_to(proj / ".env")  # inside, but at a secret
    (proj / "alias.py").symlink_to("pkg/model.py")  # inside, at uploaded code: kept
    return proj


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path)


def rungwise(*args: str, cwd: Path, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI") and not k.startswith("RAY_AUTH")}
    base["PYTHONPATH"] = str(ROOT)
    base["PYTHONSAFEPATH"] = "1"  # `-m jobs` is rungwise's, not the attack project's in cwd
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd, text=True,
                          capture_output=True, env={**base, **(env or {})}, timeout=120)


def listed(stdout: str) -> list[str]:
    """The file names of a --dry-run listing (lines `SIZE  NAME`)."""
    rows = [ln.split(None, 1) for ln in stdout.splitlines() if ln[:12].strip().replace(",", "")
            .isdigit()]
    return sorted(name for _, name in rows)


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers 404 to everything; the server keeps what it saw in `seen`."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.server.seen.append((self.path, self.headers.get("Authorization")))  # type: ignore
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def recorder() -> Iterator[tuple[int, list[tuple[str, str | None]]]]:
    """An HTTP server on 0.0.0.0 that records each request's path and Authorization header."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Recorder)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], server.seen  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def own_ip() -> str:
    """A non-loopback address of this machine (where the recorder also listens)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    ips = [ip for ip in out if ":" not in ip and not ip.startswith("127.")]
    if not ips:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return ips[0]


# --- what is uploaded ---------------------------------------------------------------------


def test_dry_run_lists_the_project_and_none_of_the_secrets(project: Path, recorder: tuple[
        int, list[tuple[str, str | None]]]) -> None:
    port, seen = recorder
    out = rungwise("submit", "specs/job.yaml", "--dry-run", "--allow-local-tracking",
                   "--address", f"http://127.0.0.1:{port}", cwd=project,
                   env={"RAY_AUTH_TOKEN": f"tok-{MARK}"})
    assert out.returncode == 0, out.stderr
    assert seen == []  # the cluster's address was never contacted
    assert listed(out.stdout) == sorted(EXPECTED)
    assert MARK not in out.stdout + out.stderr
    sizes = {n: (project / n).stat().st_size for n in EXPECTED}
    assert f"total: {len(EXPECTED)} files, {sum(sizes.values()):,} bytes" in out.stdout
    assert "entrypoint: python -m jobs tune specs/job.yaml" in out.stdout
    secrets = next(ln for ln in out.stderr.splitlines() if "left out as secrets" in ln)
    for name in (".env", ".netrc", "id_rsa", ".aws/", "service-account.json", "conf/db.env",
                 "deploy/tls.key"):
        assert name in secrets
    links = next(ln for ln in out.stderr.splitlines() if "left out symlinks" in ln)
    assert "ray_token" in links and "data/home" in links and "innocent.txt" in links


def test_the_zip_holds_exactly_the_listing_and_no_secret_bytes(project: Path) -> None:
    req = SubmitRequest(spec=str(project / "specs" / "job.yaml"))
    spec = load_spec(req.spec, {})
    with packaged(req, spec) as pkg:
        with zipfile.ZipFile(pkg.runtime_env["working_dir"]) as zf:
            names = sorted(zf.namelist())
            blobs = {n: zf.read(n) for n in names}
    assert names == sorted(EXPECTED)
    assert not [n for n, b in blobs.items() if MARK.encode() in b]
    assert blobs["alias.py"] == b"W = 1\n"  # a link inside the project carries its target
    assert not Path(pkg.runtime_env["working_dir"]).exists()  # the temporary zip is gone


def test_rays_own_walker_would_have_leaked(project: Path, tmp_path: Path) -> None:
    """The attack is real: Ray's packaging, given the folder, follows the link out of it."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "ray.zip"
    create_package(str(project), target, include_gitignore=True, excludes=[])
    with zipfile.ZipFile(target) as zf:
        leaked = [n for n in zf.namelist() if MARK.encode() in zf.read(n)]
    assert "ray_token" in leaked and ".env" in leaked


def test_gitignore_opt_out_still_keeps_secrets_out(project: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    files = collect(project, excludes_for(Path("specs/job.yaml"))).files
    assert "notes/private.txt" in files and "pkg/scratch/dump.txt" in files
    assert "big/blob.bin" not in files  # .rayignore still counts
    assert not set(SECRET_FILES) & set(files)


def test_a_spec_in_no_project_is_refused_unless_working_dir(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    (loose / "data").mkdir(parents=True)
    (loose / "job.yaml").write_text(SPEC.replace("../data", "data"))
    (loose / "data" / "small.csv").write_text("x,y\n1,0\n")
    (loose / ".env").write_text(f"{MARK}\n")
    out = rungwise("submit", "job.yaml", "--dry-run", "--allow-local-tracking", cwd=loose)
    assert out.returncode == 2 and out.stdout == ""
    line = out.stderr.strip()
    assert "\n" not in line and "no pyproject.toml" in line and "--working-dir" in line
    out = rungwise("submit", "job.yaml", "--dry-run", "--allow-local-tracking",
                   "--working-dir", ".", cwd=loose)
    assert out.returncode == 0, out.stderr
    assert listed(out.stdout) == ["data/small.csv", "job.yaml"]
    out = rungwise("submit", "job.yaml", "--dry-run", "--allow-local-tracking",
                   "--working-dir", str(tmp_path / "elsewhere"), cwd=loose)
    assert out.returncode == 2 and "--working-dir" in out.stderr


def test_a_project_that_is_the_home_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'home'\n")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "job.yaml").write_text(SPEC)
    out = rungwise("submit", "work/job.yaml", "--dry-run", "--allow-local-tracking",
                   cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert out.returncode == 2 and "too broad" in out.stderr and "--working-dir" in out.stderr


def test_an_ignored_spec_is_refused(project: Path) -> None:
    (project / "notes" / "job.yaml").write_text(SPEC)
    out = rungwise("submit", "notes/job.yaml", "--dry-run", "--allow-local-tracking",
                   cwd=project)
    assert out.returncode == 2 and "left out of the upload" in out.stderr


# --- the token: never in clear to a remote host ---------------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("localhost", True), ("LOCALHOST.", True),
    ("::1", True), ("::ffff:127.0.0.1", True), ("10.0.0.5", False), ("192.0.2.2", False),
    ("head.example.com", False), ("localhost.evil.com", False), ("0.0.0.0", False),
    ("::", False), (None, False)])
def test_is_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("url", "insecure", "verdict"), [
    ("http://127.0.0.1:8265", False, "ok"), ("http://localhost:8265", False, "ok"),
    ("http://[::1]:8265", False, "ok"), ("https://head.example.com:8265", False, "ok"),
    ("http://10.0.0.5:8265", False, "refused"), ("HTTP://head:8265", False, "refused"),
    ("http://10.0.0.5:8265", True, "warned")])
def test_check_transport(url: str, insecure: bool, verdict: str) -> None:
    if verdict == "refused":
        with pytest.raises(UserError, match="ssh -L 8265:localhost:8265 HEAD.*--insecure"):
            check_transport(url, insecure)
    else:
        warning = check_transport(url, insecure)
        assert (warning is not None and "clear text" in warning) is (verdict == "warned")


def test_plain_http_to_a_remote_host_sends_nothing(recorder: tuple[
        int, list[tuple[str, str | None]]], project: Path) -> None:
    port, seen = recorder
    ip, token = own_ip(), f"tok-{MARK}"
    env = {"RAY_AUTH_TOKEN": token}
    for args in (["jobs", "list", "--address", f"http://{ip}:{port}"],
                 ["jobs", "status", "x", "--address", f"{ip}:{port}"],  # bare HOST:PORT
                 ["submit", "specs/job.yaml", "--allow-local-tracking", "--address",
                  f"{ip}:{port}"]):
        out = rungwise(*args, cwd=project, env=env)
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and "ssh -L 8265:localhost:8265" in out.stderr
        assert token not in out.stdout + out.stderr
    assert seen == []  # refused before any connection
    out = rungwise("jobs", "list", "--address", f"http://{ip}:{port}", "--insecure",
                   cwd=project, env=env)
    assert "--insecure: the Ray token and the upload go to" in out.stderr
    assert seen and seen[0][1] == f"Bearer {token}"  # the flag does let it through


def test_loopback_gets_the_token(recorder: tuple[int, list[tuple[str, str | None]]],
                                 project: Path) -> None:
    port, seen = recorder
    out = rungwise("jobs", "list", "--address", f"http://127.0.0.1:{port}", cwd=project,
                   env={"RAY_AUTH_TOKEN": "loopback-token"})
    assert out.returncode == 2  # the recorder is no Ray job server
    assert seen == [("/api/version", "Bearer loopback-token")]


# --- MLflow credentials: never in the job's env or entrypoint --------------------------------


@pytest.mark.parametrize(("uri", "secret", "clean"), [
    ("https://bob:hunter2@mlflow.example.com", True, "https://mlflow.example.com"),
    ("https://ghp_abc@mlflow.example.com/x", True, "https://mlflow.example.com/x"),
    ("https://mlflow.example.com/?token=abc&exp=1", True, "https://mlflow.example.com/?exp=1"),
    ("https://m.example.com/?X-Amz-Signature=abc", True, "https://m.example.com/"),
    ("https://mlflow.example.com:5000/", False, "https://mlflow.example.com:5000/"),
    ("postgresql://u@db/mlflow", False, "postgresql://db/mlflow"),
    ("postgresql://u:pw@db/mlflow", True, "postgresql://db/mlflow"),
    ("databricks", False, "databricks")])
def test_has_and_strip_credentials(uri: str, secret: bool, clean: str) -> None:
    assert has_credentials(uri) is secret
    assert strip_credentials(uri) == clean
    assert not has_credentials(strip_credentials(uri))


def test_tracking_uri_credentials_stay_here(project: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(str(project / "specs" / "job.yaml"), {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://bob:{MARK}@mlflow.example.com")
    env, warning = tracking_env(spec)
    assert env == {"MLFLOW_TRACKING_URI": "https://mlflow.example.com"}
    assert warning and "MLFLOW_TRACKING_USERNAME" in warning and MARK not in warning
    out = rungwise("submit", "specs/job.yaml", "--dry-run", cwd=project,
                   env={"MLFLOW_TRACKING_URI": f"https://bob:{MARK}@mlflow.example.com"})
    assert out.returncode == 0, out.stderr
    assert "MLFLOW_TRACKING_URI=https://mlflow.example.com" in out.stdout
    assert MARK not in out.stdout + out.stderr
    out = rungwise("submit", "specs/job.yaml", "--dry-run", "--set",
                   f"tracking.uri=https://mlflow.example.com/?access_token={MARK}", cwd=project)
    assert out.returncode == 2 and "carries credentials" in out.stderr
    assert MARK not in out.stdout + out.stderr
