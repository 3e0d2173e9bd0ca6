"""`rungwise schedule`: run `rungwise retrain` on the spec's `schedule.cron`, in this process.

For a machine without a cron daemon or Kubernetes (where ``infra/kubernetes/cronjob.yaml`` is
the better home). Times come from croniter, a real cron parser, in local time. Each retrain
runs in a child process (``python -m jobs retrain SPEC``), so a crash, a leak or a stuck Ray in
one run cannot take the scheduler down; its exit code is logged and the loop goes on.
A run that overruns its next slot skips it: the next time is computed after each run ends.
SIGTERM or Ctrl-C stop the loop; a running retrain gets SIGTERM and is waited for, so its
MLflow runs are closed as KILLED and its lock is released.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from jobs.spec import JobSpec

MAX_NAP_S = 60.0
"""Sleep in naps of at most this long, so a changed clock (suspend, NTP) is noticed."""


def next_times(cron: str, start: datetime, count: int) -> list[datetime]:
    """The next ``count`` times of ``cron`` strictly after ``start``."""
    from croniter import croniter

    it = croniter(cron, start)
    return [it.get_next(datetime) for _ in range(count)]


def now_local() -> datetime:
    return datetime.now().astimezone()


def parse_moment(text: str) -> datetime:
    from trainer.errors import UserError

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--once-at: not an ISO date-time: {text!r} "
                        "(e.g. 2030-01-31T02:59 or 2030-01-31T02:59+01:00)") from None
    return moment if moment.tzinfo else moment.astimezone()  # naive: local time


def require_cron(spec: JobSpec, spec_path: str) -> str:
    from trainer.errors import UserError

    if not spec.schedule.cron:
        raise UserError(f"schedule.cron: not set in {spec_path}; add e.g. "
                        "schedule: {cron: \"0 3 * * *\"} or use `rungwise retrain` once")
    return str(spec.schedule.cron)


def retrain_argv(spec_path: str, overrides: list[str]) -> list[str]:
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [sys.executable, "-m", "jobs", "retrain", str(Path(spec_path).resolve()), *sets]


class Stopper:
    """SIGTERM / SIGINT -> stop the loop; a running child gets SIGTERM and is waited for."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        self.decision: str | None = None
        """The last retrain's one-line decision (promoted / kept / skipped / rejected)."""

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum: int, frame: Any) -> None:
        self.event.set()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def wait_until(self, when: datetime, now: Callable[[], datetime]) -> bool:
        """Sleep until ``when``; True if told to stop first."""
        while (left := (when - now()).total_seconds()) > 0:
            if self.nap(min(left, MAX_NAP_S)):
                return True
        return self.event.is_set()

    def nap(self, seconds: float) -> bool:
        return self.event.wait(seconds)

    def run(self, argv: list[str]) -> int:
        from jobs.drift import DECISION_FILE

        with tempfile.TemporaryDirectory() as tmp:  # the child writes its decision there
            decision = Path(tmp) / "decision"
            self.child = subprocess.Popen(argv, env={**os.environ,
                                                     DECISION_FILE: str(decision)})
            try:
                return self.child.wait()
            finally:
                self.child = None
                self.decision = decision.read_text().strip() if decision.is_file() else None


def log(message: str) -> None:
    print(f"{now_local().isoformat(timespec='seconds')} rungwise schedule: {message}",
          flush=True)


def run_schedule(cron: str, argv: list[str], *, max_runs: int | None = None,
                 stopper: Stopper | None = None,
                 now: Callable[[], datetime] = now_local,
                 run: Callable[[list[str]], int] | None = None) -> int:
    """Loop: wait for the next cron time, run ``argv``, log its exit code; returns runs done."""
    stopper = stopper or Stopper()
    run = run or stopper.run
    done = 0
    while max_runs is None or done < max_runs:
        when = next_times(cron, now(), 1)[0]
        log(f"next retrain at {when.isoformat(timespec='seconds')} ({cron})")
        if stopper.wait_until(when, now):
            break
        started = time.monotonic()
        code = run(argv)
        done += 1
        outcome = "ok" if code == 0 else "failed; the schedule goes on"
        log(f"run {done} exited {code} ({outcome}) after {time.monotonic() - started:.1f} s")
        if stopper.decision:
            log(f"run {done} decision: {stopper.decision}")
        if stopper.event.is_set():
            break
    log(f"stopped after {done} run(s)")
    return done


def schedule_command(spec: JobSpec, spec_path: str, overrides: list[str], *, dry_run: bool,
                     count: int, once_at: str | None, max_runs: int | None) -> int:
    cron = require_cron(spec, spec_path)
    if once_at is not None:
        print(next_times(cron, parse_moment(once_at), 1)[0].isoformat())
        return 0
    if dry_run:
        for when in next_times(cron, now_local(), count):
            print(when.isoformat())
        return 0
    stopper = Stopper()
    stopper.install()
    run_schedule(cron, retrain_argv(spec_path, overrides), max_runs=max_runs, stopper=stopper)
    return 0
