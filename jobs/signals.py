"""SIGTERM, handled in one place: the commands that a scheduler or Kubernetes stops.

``rungwise tune`` and ``rungwise retrain`` treat SIGTERM as Ctrl-C: inside ``Tuner.fit``
Tune's SIGINT handler stops the trials and saves the sweep's state; elsewhere Python's
raises KeyboardInterrupt, so runs are marked KILLED and the command exits 130.
``ray.init()`` replaces a SIGTERM handler set before it with one that aborts the process;
``tuning.sweep.init_ray`` puts the caller's back (tested in tests/reliability).
(``rungwise schedule`` forwards SIGTERM to its running retrain: jobs/schedule.py.)
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def _on_sigterm(signum: int, frame: Any) -> None:
    on_sigint = signal.getsignal(signal.SIGINT)
    if callable(on_sigint):
        on_sigint(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job): interrupt anyway
        raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """From now on SIGTERM does what Ctrl-C does (only the main thread can install it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
