"""Everything rungwise says to MLflow lives here (and in ``tuning/registry.py``).

* The tracking URI is resolved once in the driver and made absolute: trials run in their own
  working directories, and MLflow's default ``sqlite:///mlflow.db`` is relative.
* ``RunLogger`` sends metrics from a background thread in batches (at most 1,000 per
  ``log_batch``), so a slow server never slows training; calls are retried, and what could
  not be sent is counted and written to the run as a tag.
* Secrets never reach MLflow: params, tags and the logged spec go through
  ``tuning.secrets`` (re-exported here as ``mask_uri`` / ``mask_secrets`` / ``MASK``).
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import queue
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from tuning.errors import TrackingError
from tuning.secrets import MASK as MASK  # re-exported: callers import them from here
from tuning.secrets import mask_secrets as mask_secrets
from tuning.secrets import mask_uri as mask_uri

log = logging.getLogger("rungwise.tracking")
MAX_BATCH = 1000
MAX_PARAMS = 100


def resolve_tracking_uri(spec_uri: str | None) -> str:
    """Spec > ``MLFLOW_TRACKING_URI`` > MLflow's default, with local paths made absolute."""
    import mlflow

    uri = spec_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///"):]
        return "sqlite:///" + str(Path(path).resolve())
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking.uri: {mask_uri(uri)!r} is MLflow's file store, which "
                            "MLflow 3 refuses; use sqlite:///PATH.db or an http(s):// server")
    if mask_uri(uri) != uri:  # MLflow prints "View run at <uri>" to stdout, password and all
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return uri


def health_request(uri: str) -> urllib.request.Request:
    """``GET <uri>/health``; a ``user:password@`` in the URI becomes a Basic auth header, as
    MLflow's own client sends it (urllib would take it for part of the host name)."""
    parts = urlsplit(uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    url = urlunsplit(parts._replace(netloc=host, path=parts.path.rstrip("/") + "/health",
                                    query="", fragment=""))
    req = urllib.request.Request(url)
    if at:
        user, _, password = userinfo.partition(":")
        pair = f"{unquote(user)}:{unquote(password)}".encode()
        req.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    return req


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any trial runs when an MLflow server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(health_request(uri), timeout=timeout) as resp:  # noqa: S310
            if resp.status == 200:
                return
            raise TrackingError(f"tracking.uri: {mask_uri(uri)} answered {resp.status} on "
                                "/health")
    except TrackingError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: a URI urllib cannot parse
        reason = mask_uri(str(getattr(exc, "reason", exc)))
        raise TrackingError(f"tracking.uri: MLflow server {mask_uri(uri)} is not reachable "
                            f"({reason}); start it or fix the URI") from None


_OPENED: set[str] = set()


def client(uri: str) -> Any:
    """An MlflowClient; the first one of a SQLite store in this process opens it under a
    file lock, since two processes that open a fresh store at the same moment race in
    MLflow's schema migrations (``duplicate column name: step``)."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _OPENED:
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    with FileLock(str(db.with_name(db.name + ".lock")), timeout=300):
        cl = MlflowClient(tracking_uri=uri)
        cl.search_experiments(max_results=1)  # creates or migrates the schema
        cl.search_registered_models(max_results=1)  # and the registry's store
    _OPENED.add(uri)
    return cl


def experiment_id(cl: Any, name: str) -> str:
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            cl.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    try:
        return str(cl.create_experiment(name))
    except Exception:  # created by a concurrent process in the meantime
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def params_of(flat: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, mask_uri(str(v))[:6000]) for k, v in mask_secrets(flat).items()]


def log_params(cl: Any, run_id: str, flat: dict[str, Any]) -> None:
    params = params_of(flat)
    for i in range(0, len(params), MAX_PARAMS):
        cl.log_batch(run_id, params=params[i:i + MAX_PARAMS], synchronous=True)


def metrics_of(values: dict[str, Any], step: int, ts: int | None = None) -> list[Any]:
    from mlflow.entities import Metric

    ts = ts or int(time.time() * 1000)
    return [Metric(k, float(v), ts, step) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]


class RunLogger:
    """Ordered, batched, retried MLflow writes from one background thread.

    ``submit(fn)`` queues any client call; ``metrics(run_id, values, step)`` buffers metrics
    that go out in ``log_batch`` calls of at most 1,000. ``close()`` flushes and waits.
    """

    def __init__(self, uri: str, retry_window_s: float = 180.0, backoff_s: float = 1.0
                 ) -> None:
        self.client = client(uri)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._window, self._backoff = retry_window_s, backoff_s
        self.lost: dict[str, int] = {}
        self.errors: list[str] = []
        self._down = False
        """A write gave up after the whole retry window: later writes get one try each until
        one succeeds (a server that is gone for good costs one window, not one per write)."""
        self._progress = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="rungwise-mlflow", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Any], Any]) -> None:
        self._queue.put(("call", fn))

    def metrics(self, run: str | Callable[[], str | None], values: dict[str, Any],
                step: int) -> None:
        """``run`` is a run id, or a callable giving it once the run exists."""
        self._queue.put(("metrics", (run, metrics_of(values, step))))

    def flush(self, timeout: float = 120.0) -> None:
        """Wait until everything queued before is sent (or given up). ``timeout`` bounds a
        stall, not the whole wait: while writes keep going out (a server back after an outage,
        a slow machine) the wait goes on, so nothing queued is read before it is written."""
        done = threading.Event()
        self._queue.put(("flush", done))
        while not done.wait(1.0):
            stalled = time.monotonic() - self._progress
            if stalled > timeout + self._window or not self._thread.is_alive():
                return

    def close(self, timeout: float = 300.0) -> None:
        self.flush(timeout)
        self._queue.put(("stop", None))
        self._thread.join(timeout)

    def _work(self) -> None:
        pending: dict[str, list[Any]] = {}
        while True:
            try:
                kind, item = self._queue.get(timeout=0.5)
            except queue.Empty:
                self._send_metrics(pending)
                continue
            self._progress = time.monotonic()
            if kind == "metrics":
                run, ms = item
                run_id = run() if callable(run) else run
                if run_id is None:  # its run could not be created: count the loss
                    self.lost["?"] = self.lost.get("?", 0) + len(ms)
                    continue
                pending.setdefault(run_id, []).extend(ms)
                if sum(len(v) for v in pending.values()) >= MAX_BATCH:
                    self._send_metrics(pending)
                continue
            self._send_metrics(pending)  # keep the order: metrics before later calls
            if kind == "call":
                self._retry(functools.partial(item, self.client), what="call")
            elif kind == "flush":
                item.set()
            elif kind == "stop":
                return

    def _send_metrics(self, pending: dict[str, list[Any]]) -> None:
        for run_id, ms in list(pending.items()):
            for i in range(0, len(ms), MAX_BATCH):
                chunk = ms[i:i + MAX_BATCH]
                ok = self._retry(functools.partial(self.client.log_batch, run_id, metrics=chunk,
                                                   synchronous=True), what="metrics")
                if not ok:
                    self.lost[run_id] = self.lost.get(run_id, 0) + len(chunk)
        pending.clear()

    def _retry(self, fn: Callable[[], Any], what: str) -> bool:
        """Retry for up to the retry window (a server restart, a network blip), then give
        up on this write, count it, and go on: training never waits for MLflow."""
        window = 0.0 if self._down else self._window
        delay, deadline, attempt = self._backoff, time.monotonic() + window, 0
        while True:
            attempt += 1
            try:
                fn()
                self._down = False
                self._progress = time.monotonic()
                return True
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    self._down = True
                    text = mask_uri(str(exc))
                    self.errors.append(f"{what}: {type(exc).__name__}: {text[:200]}")
                    log.warning("MLflow %s failed after %d tries: %s", what, attempt, text)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 15.0)
