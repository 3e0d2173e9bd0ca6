"""Run a job spec on a Ray cluster as a Ray job (`rungwise submit`), or list what it would upload.

``rungwise submit SPEC --address https://HEAD:8265`` uploads the project folder (the nearest
folder above the spec that holds ``pyproject.toml``, or ``--working-dir``) as the job's
``working_dir`` and runs ``python -m jobs <command> <spec> [--set ...]`` there. The spec file is
shipped as-is and named relative to that folder, so its relative data paths resolve on the
cluster exactly as they do here. What is uploaded (never secrets, never what a symlink out of the
folder points at) is decided in ``jobs/upload.py``; ``--dry-run`` lists it and contacts nothing.

Which Python runs the job: the entrypoint's ``python`` is looked up on the PATH of the process
that started the head (``ray start --head``). A head started outside the environment that has
rungwise's dependencies runs jobs with the system Python (``No module named 'ray'``): start the
head with that environment active (or in the rungwise image), or pass ``--python /path/to/python``.
The project's own code travels in the working_dir; its dependencies do not (``--pip`` installs
extra packages per job).

Tracking: the job logs to MLflow from the cluster, where a local SQLite file or ``mlruns``
folder of this machine does not exist, so a spec whose effective tracking URI (spec, else
``MLFLOW_TRACKING_URI``, else MLflow's local default) is local is refused unless
``--allow-local-tracking``. A runtime_env's env_vars and the entrypoint are shown to anyone who
can list jobs, so credentials never go there: a spec URI holding credentials (``user:pass@``, a
token in the query) is refused, and ``MLFLOW_TRACKING_URI`` is forwarded without them (the
cluster supplies ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` or
``MLFLOW_TRACKING_TOKEN`` itself), with a warning.

The cluster side (address, token, errors) is ``jobs/cluster.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from jobs.cluster import Cluster, check_transport, connect, resolve_address
from jobs.upload import Upload, collect, excludes_for, project_root, write_zip
from trainer.errors import UserError

if TYPE_CHECKING:

    from jobs.spec import JobSpec

COMMANDS = ("tune", "train", "retrain")
HIDDEN_COMMANDS = ("inspect",)  # no tracking; used by the tests to check the plumbing
UPLOAD_LIMIT = 100 * 2**20  # the dashboard's request size limit (DASHBOARD_CLIENT_MAX_SIZE)
SECRET_QUERY = re.compile(r"pass|secret|token|key|auth|sig|credential|session", re.IGNORECASE)
CREDENTIALS_HELP = ("set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                    "MLFLOW_TRACKING_TOKEN) in the cluster's own environment")


@dataclass(kw_only=True, slots=True)
class SubmitRequest:
    spec: str
    """Path of the YAML spec, shipped as-is."""
    overrides: list[str] = field(default_factory=list)
    """``KEY.PATH=VALUE`` items, checked here and passed on as ``--set``."""
    address: str | None = None
    command: str = "tune"
    python: str = "python"
    pip: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    """Extra arguments for the command on the cluster (``--no-register``)."""
    allow_local_tracking: bool = False
    working_dir: str | None = None
    """The folder to upload; default: the project (pyproject.toml) above the spec."""
    dry_run: bool = False
    """List what would be uploaded and exit, contacting nothing."""
    insecure: bool = False
    """Allow plain http to a host that is not loopback (the token goes in clear)."""
    debug: bool = False
    """Keep Ray's client logging."""


# --- tracking ------------------------------------------------------------------------------


def effective_tracking_uri(spec: JobSpec) -> str | None:
    return spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def is_local_uri(uri: str | None) -> bool:
    """True for MLflow stores only this machine sees: None (MLflow's default), sqlite, files."""
    if not uri:
        return True
    if uri.split(":", 1)[0].lower() in ("databricks", "databricks-uc"):
        return False
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return scheme in ("", "file", "sqlite")


def has_credentials(uri: str) -> bool:
    """A password, an http(s) user (a token), or a query parameter named like a secret."""
    parts = urlsplit(uri)
    if parts.password or (parts.username and parts.scheme.lower() in ("http", "https")):
        return True
    return any(SECRET_QUERY.search(key) for key, _ in parse_qsl(parts.query))


def strip_credentials(uri: str) -> str:
    """The URI without its user info and secret-looking query parameters."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if not SECRET_QUERY.search(k)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


def check_tracking(spec: JobSpec, allow_local: bool) -> str | None:
    """Refuse local tracking unless allowed; a note to print once submitted, if allowed."""
    uri = effective_tracking_uri(spec)
    if not is_local_uri(uri):
        return None
    shown = uri or "MLflow's default (sqlite:///mlflow.db in the job's folder)"
    if not allow_local:
        raise UserError(f"tracking.uri: {shown} is local to this machine and the Ray cluster "
                        "cannot see it; use an http(s):// MLflow server (tracking.uri or "
                        "MLFLOW_TRACKING_URI) or pass --allow-local-tracking")
    return f"rungwise: note: the job tracks to {shown} on the cluster's disk"


def check_spec_credentials(spec: JobSpec) -> None:
    """A spec's URI travels in the uploaded spec or in the entrypoint (--set): no secrets."""
    from tuning.tracking import mask_uri

    uri = spec.tracking.uri
    if uri and has_credentials(uri):
        raise UserError(f"tracking.uri: {mask_uri(strip_credentials(uri))} carries credentials, "
                        "which would reach the cluster in the spec or the job's entrypoint "
                        f"(shown to anyone who lists jobs); drop them from the URI and "
                        f"{CREDENTIALS_HELP}")


def tracking_env(spec: JobSpec) -> tuple[dict[str, str], str | None]:
    """MLFLOW_TRACKING_URI for the job when the spec has none, minus credentials; a warning."""
    from tuning.tracking import mask_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if spec.tracking.uri or not uri:
        return {}, None
    if not has_credentials(uri):
        return {"MLFLOW_TRACKING_URI": uri}, None
    clean = strip_credentials(uri)
    return {"MLFLOW_TRACKING_URI": clean}, (
        f"rungwise: warning: MLFLOW_TRACKING_URI holds credentials; the job gets "
        f"{mask_uri(clean)} without them (a job's env is shown to anyone who lists jobs): "
        f"{CREDENTIALS_HELP}")


# --- what is shipped -------------------------------------------------------------------


@dataclass(slots=True)
class Package:
    """The zip that becomes the job's working_dir, and what the job runs."""

    upload: Upload
    zip_path: Path
    rel_spec: Path
    runtime_env: dict[str, Any]
    entrypoint: str
    notes: list[str]


@contextmanager
def packaged(req: SubmitRequest, spec: JobSpec) -> Iterator[Package]:
    """Collect and zip the working_dir in a temporary folder removed afterwards."""
    root = project_root(Path(req.spec), req.working_dir)
    rel_spec = Path(req.spec).resolve().relative_to(root)
    upload = collect(root, excludes_for(rel_spec))
    if rel_spec.as_posix() not in upload.files:
        raise UserError(f"{req.spec}: the spec itself is left out of the upload of {root} (by "
                        ".gitignore, .rayignore or a secret pattern); rename or un-ignore it")
    raw = sum(p.stat().st_size for p in upload.files.values())
    if raw > 4 * UPLOAD_LIMIT:  # do not zip gigabytes to find out
        _too_big(root, raw)
    notes = _upload_notes(upload, spec.data.path)
    env, warning = tracking_env(spec)
    notes += [warning] if warning else []
    with tempfile.TemporaryDirectory(prefix="rungwise-submit-") as tmp:
        zip_path = write_zip(upload, Path(tmp) / "working_dir.zip")
        if zip_path.stat().st_size > UPLOAD_LIMIT:
            _too_big(root, zip_path.stat().st_size)
        runtime: dict[str, Any] = {"working_dir": str(zip_path),
                                   "env_vars": {"PYTHONUNBUFFERED": "1", **env}}
        if req.pip:
            runtime["pip"] = list(req.pip)
        yield Package(upload, zip_path, rel_spec, runtime, entrypoint(req, rel_spec), notes)


def _too_big(root: Path, size: int) -> None:
    raise UserError(f"the project folder {root} holds {size / 2**20:.0f} MiB to upload; the "
                    f"job server takes {UPLOAD_LIMIT // 2**20} MiB: list big files in "
                    ".rayignore or read the data from a URI")


def _upload_notes(upload: Upload, data_path: str) -> list[str]:
    notes = []
    if upload.secrets:
        notes.append("rungwise: left out as secrets: " + ", ".join(upload.secrets))
    if upload.links:
        notes.append("rungwise: left out symlinks (pointing out of the folder or at what is not "
                     "uploaded): " + ", ".join(upload.links))
    data = Path(data_path)
    if "://" in data_path:
        return notes
    if not data.is_relative_to(upload.root):
        notes.append(f"rungwise: warning: data.path {data_path} is outside {upload.root}, which "
                     "is all that is uploaded: the cluster must see it at that same path")
    elif data.is_file() and data.relative_to(upload.root).as_posix() not in upload.files:
        notes.append(f"rungwise: warning: data.path {data_path} is left out of the upload "
                     "(.gitignore, .rayignore or a secret pattern): the job will not find it")
    return notes


def entrypoint(req: SubmitRequest, rel_spec: Path) -> str:
    argv = [req.python, "-m", "jobs", req.command, rel_spec.as_posix()]
    for item in req.overrides:
        argv += ["--set", item]
    return shlex.join(argv + list(req.args))


def submission_id(name: str, command: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:40] or "job"
    return f"rungwise-{slug}-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


# --- submit ---------------------------------------------------------------------------


def _checked_spec(req: SubmitRequest) -> tuple[JobSpec, str | None]:
    from jobs.spec import load_spec, parse_overrides

    spec = load_spec(req.spec, parse_overrides(req.overrides))
    check_spec_credentials(spec)
    note = None
    if req.command != "inspect" and "--no-tracking" not in req.args:
        note = check_tracking(spec, req.allow_local_tracking)
    return spec, note


def dry_run(req: SubmitRequest) -> int:
    """Print every file the job would get, the total size and the entrypoint; contact nothing."""
    import zipfile

    from tuning.tracking import mask_uri

    spec, note = _checked_spec(req)
    url = None
    if req.address or os.environ.get("RAY_ADDRESS"):
        url = resolve_address(req.address)
        warning = check_transport(url, req.insecure)
        note = "\n".join(filter(None, [note, warning])) or None
    with packaged(req, spec) as pkg:
        with zipfile.ZipFile(pkg.zip_path) as zf:
            infos = zf.infolist()
        zipped = pkg.zip_path.stat().st_size
    for info in infos:
        print(f"{info.file_size:>12,}  {info.filename}")
    total = sum(i.file_size for i in infos)
    print(f"total: {len(infos)} files, {total:,} bytes ({zipped:,} bytes zipped) from "
          f"{pkg.upload.root}")
    print(f"entrypoint: {pkg.entrypoint}")
    env = pkg.runtime_env["env_vars"]
    print("job env: " + " ".join(f"{k}={mask_uri(v)}" for k, v in env.items()))
    print(f"job server: {url or '(none given)'}; dry run: nothing was sent")
    for line in pkg.notes + ([note] if note else []):
        print(line, file=sys.stderr)
    return 0


def submit(req: SubmitRequest) -> tuple[Cluster, str]:
    """Validate, refuse what the cluster could not run, submit; the cluster and the job id."""
    spec, note = _checked_spec(req)
    check_transport(resolve_address(req.address), req.insecure)  # before packaging anything
    with packaged(req, spec) as pkg:
        cluster = connect(req.address, req.debug, req.insecure)
        for line in pkg.notes:
            print(line, file=sys.stderr)
        total = sum(p.stat().st_size for p in pkg.upload.files.values())
        print(f"rungwise: uploading {len(pkg.upload.files)} files ({total / 2**20:.1f} MiB, "
              f"{pkg.zip_path.stat().st_size / 2**20:.1f} MiB zipped) from {pkg.upload.root} as "
              "the job's working_dir", file=sys.stderr, flush=True)
        job_id = _submit_job(cluster, entrypoint=pkg.entrypoint, runtime_env=pkg.runtime_env,
                             submission_id=submission_id(spec.name, req.command),
                             metadata={"rungwise_spec": pkg.rel_spec.as_posix(),
                                       "rungwise_command": req.command})
    print(f"submitted: {job_id}", flush=True)
    if note:
        print(note, file=sys.stderr)
    hint = f"rungwise jobs logs {job_id} --follow --address {cluster.url}"
    print(f"rungwise: follow with `{hint}`", file=sys.stderr, flush=True)
    return cluster, job_id


def _submit_job(cluster: Cluster, attempts: int = 4, **kwargs: Any) -> str:
    """submit_job, retried while a just-started head has no job agent yet (HTTP 500)."""
    with cluster.errors():
        for attempt in range(1, attempts):
            try:
                return str(cluster.client.submit_job(**kwargs))
            except RuntimeError as exc:
                if "No available agent" not in str(exc):
                    raise
                print("rungwise: the head has no job agent yet; retrying", file=sys.stderr)
                time.sleep(2.0 * attempt)
        return str(cluster.client.submit_job(**kwargs))
