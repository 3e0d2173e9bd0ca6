"""Talk to a Ray cluster's job server: its address, the token, and its errors as one line.

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
A cluster without auth ignores the header. Over ``http://`` the token travels in clear, so plain
http (also a bare ``HOST:PORT``) is refused before any connection unless the host is loopback
(127.0.0.0/8, ::1, localhost: an SSH tunnel) or ``--insecure`` is given. The token is never
printed: it lives only in the request headers, errors are re-raised without their causes and
scrubbed of it. The job itself inherits the head's mode and token; nothing about the token goes
into the runtime_env.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from trainer.errors import UserError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

TOKEN_HELP = ("put the cluster's token in ~/.ray/auth_token (`ray get-auth-token` on the head "
              "prints it) or point RAY_AUTH_TOKEN_PATH at a file holding it")


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


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) or ``localhost``; names are not resolved."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def check_transport(url: str, insecure: bool) -> str | None:
    """Refuse plain http to a host that is not loopback; the warning to print if --insecure."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "http" or is_loopback(parts.hostname):
        return None
    if not insecure:
        raise UserError(f"--address {url}: plain http to {parts.hostname} would send the Ray "
                        "token and the upload in clear text; use an SSH tunnel (ssh -L "
                        "8265:localhost:8265 HEAD, then --address http://localhost:8265) or "
                        "https://, or pass --insecure")
    return (f"rungwise: warning: --insecure: the Ray token and the upload go to "
            f"{parts.hostname} in clear text")


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


def connect(address: str | None, debug: bool = False, insecure: bool = False) -> Cluster:
    """A job client for the cluster, with the token header when one is available."""
    url = resolve_address(address)
    warning = check_transport(url, insecure)  # before the token is read or anything is sent
    if warning:
        print(warning, file=sys.stderr, flush=True)
    headers = auth_headers()
    _probe(url, headers)
    with cluster_errors(url, headers):
        from ray.job_submission import JobSubmissionClient

        quiet_ray(debug)  # after importing ray, which sets up its loggers
        return Cluster(JobSubmissionClient(url, headers=dict(headers)), url, headers)
