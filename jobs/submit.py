"""Run a job spec on a Ray cluster as a Ray job, and talk to the cluster's job server.

``rungwise submit SPEC --address http://HEAD:8265`` uploads the project folder (the nearest
folder above the spec that holds ``pyproject.toml``, else the spec's folder) as the job's
``working_dir`` and runs ``python -m jobs <command> <spec> [--set ...]`` there. The spec file is
shipped as-is and named relative to that folder, so its relative data paths resolve on the
cluster exactly as they do here.

Which Python runs the job: the entrypoint's ``python`` is looked up on the PATH of the process
that started the head (``ray start --head``). A head started outside the environment that has
rungwise's dependencies runs jobs with the system Python (``No module named 'ray'``): start the
head with that environment active (or in the rungwise image), or pass ``--python /path/to/python``.
The project's own code travels in the working_dir; its dependencies do not (``--pip`` installs
extra packages per job).

Tracking: the job logs to MLflow from the cluster, where a local SQLite file or ``mlruns``
folder of this machine does not exist, so a spec whose effective tracking URI (spec, else
``MLFLOW_TRACKING_URI``, else MLflow's local default) is local is refused unless
``--allow-local-tracking``. ``MLFLOW_TRACKING_URI`` is forwarded to the job; MLflow credentials
are not (a runtime_env's env_vars are shown to anyone who can list jobs): set them on the cluster.

How the Ray token reaches the job server (Ray 2.60, read in ray/_private/authentication/ and
ray/dashboard/modules/dashboard_sdk.py):

- With token auth on, the dashboard (port 8265, the job server) wants ``Authorization: Bearer
  <token>`` on every request but a few health paths: none -> 401 "Missing authentication
  token", a wrong one -> 403.
- ``ray.init()`` starting a local cluster turns token mode on (unless ``RAY_AUTH_MODE`` is set)
  and writes ``~/.ray/auth_token`` if it is missing; ``ray start --head`` turns it on when
  ``RAY_AUTH_MODE`` is unset and a token already exists.
- ``JobSubmissionClient`` adds the header only when the *client* process runs with
  ``RAY_AUTH_MODE=token``: with the variable unset it sends nothing, even with
  ``~/.ray/auth_token`` present (hence ``RAY_AUTH_MODE=token ray job submit``). An explicit
  ``headers={"Authorization": ...}`` argument is kept as given.
- Ray reads the token (``ray._raylet.AuthenticationTokenLoader``) from, in order:
  ``RAY_AUTH_TOKEN`` (the value), ``RAY_AUTH_TOKEN_PATH`` (a file; unreadable or empty is an
  error), ``~/.ray/auth_token``.

So rungwise loads the token with Ray's own loader whatever the mode and passes the header to
``JobSubmissionClient(headers=...)``: having the token file is enough. ``RAY_AUTH_MODE=disabled``
sends no token; ``RAY_AUTH_MODE=token`` without a token fails before contacting the cluster.
A cluster without auth ignores the header. The token travels in clear over ``http://``: use
``https://`` or an SSH tunnel to reach a remote head. It is never printed: it lives only in the
request headers, errors are re-raised without their causes and scrubbed of it. The job itself
inherits the head's mode and token; nothing about the token goes into the runtime_env.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.cli import UserError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from jobs.spec import JobSpec

COMMANDS = ("tune", "train", "retrain")
HIDDEN_COMMANDS = ("inspect",)  # no tracking; used by the tests to check the plumbing
EXCLUDES = (".venv", ".git", "mlruns", "mlartifacts", "mlflow.db", "rungwise-runs", "*.pyc",
            "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis",
            "*.egg-info", "tests")
UPLOAD_LIMIT = 100 * 2**20  # the dashboard's request size limit (DASHBOARD_CLIENT_MAX_SIZE)
TOKEN_HELP = ("put the cluster's token in ~/.ray/auth_token (`ray get-auth-token` on the head "
              "prints it) or point RAY_AUTH_TOKEN_PATH at a file holding it")


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
    debug: bool = False
    """Keep Ray's client logging."""


@dataclass(slots=True)
class Cluster:
    """A job client bound to one cluster, and the headers it sends (to scrub from errors)."""

    client: JobSubmissionClient
    url: str
    headers: dict[str, str]

    def errors(self, job_id: str | None = None) -> AbstractContextManager[None]:
        return cluster_errors(self.url, self.headers, job_id)

    def scrub(self, text: str) -> str:
        return _scrub(text, self.headers)


# --- the cluster: address, token, errors ----------------------------------------------


def resolve_address(address: str | None) -> str:
    """The job server URL: ``--address``, else ``RAY_ADDRESS``; ``HOST:PORT`` gets http://."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no Ray cluster given: pass --address http://HEAD:8265 "
                        "or set RAY_ADDRESS")
    address = address.strip().rstrip("/")
    if address.startswith("ray://") or address == "auto":
        raise UserError(f"--address {address}: give the head's dashboard URL "
                        "(http://HEAD:8265), not a Ray client or GCS address")
    return address if "://" in address else f"http://{address}"


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header for the job server, or {} when there is no token."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.environ.get("RAY_AUTH_TOKEN") and not _readable(Path(path)):
        raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: the file cannot be read or is empty")
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # read the sources now, as this call's environment has them
    if loader.has_token(ignore_auth_mode=True):
        return dict(loader.get_token_for_http_header(ignore_auth_mode=True))
    if mode == "token":
        raise UserError(f"RAY_AUTH_MODE=token but no Ray token was found: {TOKEN_HELP}")
    return {}


def _readable(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0 and os.access(path, os.R_OK)
    except OSError:
        return False


def _scrub(text: str, headers: dict[str, str]) -> str:
    for value in headers.values():
        secret = value.removeprefix("Bearer ").strip()
        if secret:
            text = text.replace(secret, "***")
    return " ".join(text.split())


@contextmanager
def cluster_errors(address: str, headers: dict[str, str], job_id: str | None = None
                   ) -> Iterator[None]:
    """Turn the job client's failures into one-line UserErrors naming the address."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except UserError:
        raise
    except AuthenticationError as exc:
        raise UserError(f"the Ray cluster at {address} refused the request "
                        f"({_scrub(str(exc), headers)[:120]}); {TOKEN_HELP}") from None
    except (OSError, requests.RequestException, aiohttp.ClientError) as exc:
        raise UserError(f"cannot reach the Ray job server at {address} ({type(exc).__name__}): "
                        f"{_scrub(str(exc), headers)[:300]}") from None
    except (RuntimeError, ValueError) as exc:
        text = _scrub(str(exc), headers)
        if job_id and ("404" in text or "does not exist" in text):
            raise UserError(f"no job {job_id!r} on {address}; see `rungwise jobs list`") from None
        raise UserError(f"Ray job server at {address}: {text[:500]}") from None


def _probe(address: str, headers: dict[str, str], timeout: float = 10.0) -> None:
    """Fail fast (bounded wait) when nothing, or not a Ray job server, answers at address."""
    import requests

    try:
        r = requests.get(f"{address}/api/version", headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise UserError(f"cannot reach the Ray job server at {address} ({type(exc).__name__}); "
                        "is the head running, and is this its dashboard URL?") from None
    if r.status_code == 401:
        raise UserError(f"the Ray cluster at {address} requires a token and none was found "
                        f"here: {TOKEN_HELP}")
    if r.status_code == 403:
        raise UserError(f"the Ray cluster at {address} refused this machine's token: it is "
                        f"not the cluster's; {TOKEN_HELP}")
    if r.status_code != 200 or "ray_version" not in r.text:
        raise UserError(f"{address} does not answer like a Ray job server "
                        f"(GET /api/version -> HTTP {r.status_code})")


def quiet_ray(debug: bool = False) -> None:
    """Hide the job client's INFO chatter (one line per .gitignore it honours) unless debugging."""
    if debug:
        return
    levels = {"ray": logging.WARNING, "ray.dashboard.modules.dashboard_sdk": logging.WARNING,
              "ray.dashboard.modules.job.sdk": logging.WARNING,
              "ray._private.runtime_env.packaging": logging.WARNING,
              # warns that .venv is excluded by default: rungwise excludes it anyway
              "ray._private.runtime_env.working_dir": logging.ERROR}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def connect(address: str | None, debug: bool = False) -> Cluster:
    """A job client for the cluster, with the token header when one is available."""
    url = resolve_address(address)
    headers = auth_headers()
    _probe(url, headers)
    with cluster_errors(url, headers):
        from ray.job_submission import JobSubmissionClient

        quiet_ray(debug)  # after importing ray, which sets up its loggers
        return Cluster(JobSubmissionClient(url, headers=dict(headers)), url, headers)


# --- what is shipped -------------------------------------------------------------------


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


def project_root(spec_file: Path) -> Path:
    """The nearest folder above the spec holding pyproject.toml, else the spec's folder."""
    spec_file = spec_file.resolve()
    for folder in spec_file.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return spec_file.parent


def excludes_for(rel_spec: Path) -> list[str]:
    """The upload excludes, minus any that would drop the spec itself (tests/...)."""
    parts = rel_spec.parts
    return [p for p in EXCLUDES if not any(fnmatch.fnmatch(part, p) for part in parts)]


def upload_size(root: Path, excludes: list[str]) -> int:
    """Bytes under root that Ray would zip (excludes and root .gitignore/.rayignore applied)."""
    from pathspec import GitIgnoreSpec

    lines = list(excludes)
    for name in (".gitignore", ".rayignore"):
        if (root / name).is_file():
            lines += (root / name).read_text(errors="replace").splitlines()
    ignored = GitIgnoreSpec.from_lines(lines)
    total = 0
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if not ignored.match_file(f"{rel / d}/")]
        total += sum((Path(folder) / f).stat().st_size for f in files
                     if not ignored.match_file(str(rel / f)) and (Path(folder) / f).is_file())
    return total


def runtime_env(root: Path, rel_spec: Path, pip: list[str]) -> tuple[dict[str, Any], int]:
    """The job's runtime_env and the bytes its working_dir holds."""
    excludes = excludes_for(rel_spec)
    size = upload_size(root, excludes)
    if size > UPLOAD_LIMIT:
        raise UserError(f"the project folder {root} holds {size / 2**20:.0f} MiB to upload; the "
                        f"job server takes {UPLOAD_LIMIT // 2**20} MiB: list big files in "
                        ".rayignore or read the data from a URI")
    env_vars = {"PYTHONUNBUFFERED": "1"}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    env: dict[str, Any] = {"working_dir": str(root), "excludes": excludes, "env_vars": env_vars}
    if pip:
        env["pip"] = list(pip)
    return env, size


def entrypoint(req: SubmitRequest, rel_spec: Path) -> str:
    argv = [req.python, "-m", "jobs", req.command, rel_spec.as_posix()]
    for item in req.overrides:
        argv += ["--set", item]
    return shlex.join(argv + list(req.args))


def submission_id(name: str, command: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:40] or "job"
    return f"rungwise-{slug}-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


# --- submit ---------------------------------------------------------------------------


def submit(req: SubmitRequest) -> tuple[Cluster, str]:
    """Validate, refuse what the cluster could not run, submit; the cluster and the job id."""
    from jobs.spec import load_spec, parse_overrides

    spec = load_spec(req.spec, parse_overrides(req.overrides))
    note = None
    if req.command != "inspect" and "--no-tracking" not in req.args:
        note = check_tracking(spec, req.allow_local_tracking)
    root = project_root(Path(req.spec))
    rel_spec = Path(req.spec).resolve().relative_to(root)
    _warn_outside(spec.data.path, root)
    env, size = runtime_env(root, rel_spec, req.pip)
    cluster = connect(req.address, req.debug)
    print(f"rungwise: uploading {root} ({size / 2**20:.1f} MiB before zipping) as the job's "
          "working_dir", file=sys.stderr, flush=True)
    job_id = _submit_job(cluster, entrypoint=entrypoint(req, rel_spec), runtime_env=env,
                         submission_id=submission_id(spec.name, req.command),
                         metadata={"rungwise_spec": rel_spec.as_posix(),
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


def _warn_outside(data_path: str, root: Path) -> None:
    if "://" in data_path or Path(data_path).is_relative_to(root):
        return
    print(f"rungwise: warning: data.path {data_path} is outside {root}, which is all that is "
          "uploaded: the cluster must see it at that same path", file=sys.stderr)
