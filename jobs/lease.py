"""A lease in the storage: a lock that two machines see, and that a crashed holder cannot keep.

A lease is a small JSON file (owner id, host, pid, expiry) written through the storage's
pyarrow filesystem, so it lives wherever ``tune.storage`` points: a local folder, NFS or a
bucket. Object stores have no compare-and-swap that pyarrow exposes, so taking a lease is
write-then-confirm: write our owner id, wait ``SETTLE_S``, read it back; of two processes that
both found the lease free, the one whose write landed last keeps it and the other backs off
(safe as long as a process's read-to-write gap is shorter than ``SETTLE_S``: milliseconds
against a second). The holder renews the expiry from a thread; a holder that dies stops
renewing, and its lease is free once it expires (at once when it was a process on this host
that no longer exists).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from trainer.errors import RungwiseError
from tuning.storage import StoragePath

TTL_ENV = "RUNGWISE_LEASE_TTL_S"
TTL_S = 600.0
"""A lease not renewed for this long is stale (10 minutes unless RUNGWISE_LEASE_TTL_S)."""
SETTLE_S = 1.0
POLL_S = 2.0


class LeaseHeld(RungwiseError):
    """Someone else holds the lease; ``holder`` is what its file says."""

    def __init__(self, holder: dict[str, Any]) -> None:
        super().__init__(holder.get("owner", "?"))
        self.holder = holder


@dataclass
class Lease:
    path: StoragePath
    owner: str
    ttl_s: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def record(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "expires": time.time() + self.ttl_s}

    def renew_forever(self) -> None:
        while not self._stop.wait(min(60.0, self.ttl_s / 3)):
            try:
                if (read_lease(self.path) or {}).get("owner") == self.owner:
                    self.path.write_text(json.dumps(self.record()))
            except Exception:  # storage hiccup: the next renewal tries again
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if (read_lease(self.path) or {}).get("owner") == self.owner:
                self.path.unlink()
        except Exception:  # the lease expires on its own
            pass


def ttl_s() -> float:
    return float(os.environ.get(TTL_ENV) or TTL_S)


def read_lease(path: StoragePath) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def live_holder(path: StoragePath) -> dict[str, Any] | None:
    """The lease's record while it binds; None when absent, expired or its process is gone."""
    held = read_lease(path)
    if held is None or float(held.get("expires", 0)) <= time.time():
        return None
    if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", 0))):
        return None
    return held


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(path: StoragePath, *, wait: bool = False, ttl: float | None = None) -> Lease:
    """Take the lease at ``path``; raise ``LeaseHeld`` (or wait, with ``wait``)."""
    lease = Lease(path, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}",
                  ttl or ttl_s())
    path.parent.mkdir()
    while True:
        held = live_holder(path)
        if held is None:
            path.write_text(json.dumps(lease.record()))
            time.sleep(SETTLE_S)
            held = read_lease(path) or {}
            if held.get("owner") == lease.owner:
                lease._thread = threading.Thread(target=lease.renew_forever, daemon=True,
                                                 name="rungwise-lease")
                lease._thread.start()
                return lease
        if not wait:
            raise LeaseHeld(held)
        time.sleep(POLL_S)


def describe(holder: dict[str, Any]) -> str:
    until = time.strftime("%H:%M:%S UTC", time.gmtime(float(holder.get("expires", 0))))
    return f"held by {holder.get('host', '?')} pid {holder.get('pid', '?')} until {until}"
