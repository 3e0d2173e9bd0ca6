"""`rungwise schedule`: cron times from croniter, the loop on a fake clock, stopping cleanly.

The CLI runs in subprocesses (no Ray, no MLflow is needed for any of them); the loop itself
runs in-process with an injected clock and runner, so no test sleeps until a cron minute.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from jobs.cli import UserError
from jobs.schedule import Stopper, next_times, parse_moment, run_schedule

ROOT = Path(__file__).resolve().parents[2]


def write_spec(folder: Path, cron: str | None) -> Path:
    spec = {"name": "schedule-test", "data": {"path": "absent.csv", "target": "y"},
            "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}",
                         "register_as": "schedule-test"},
            "schedule": {"cron": cron, "retrain": "refit"}}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_five_increasing_times_matching_cron(tmp_path: Path) -> None:
    out = cli("schedule", str(write_spec(tmp_path, "15 */6 * * *")), "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    times = [datetime.fromisoformat(line) for line in out.stdout.split()]
    assert len(times) == 5
    assert all(a < b for a, b in zip(times, times[1:], strict=False))
    assert all(t.minute == 15 and t.hour % 6 == 0 and t.second == 0 for t in times)
    assert times[0] > datetime.now().astimezone()
    assert times[-1] - times[0] == timedelta(hours=24)  # every 6 hours, 4 gaps


def test_dry_run_count_and_once_at(tmp_path: Path) -> None:
    spec = str(write_spec(tmp_path, "0 3 * * 1"))  # Mondays at 03:00
    out = cli("schedule", spec, "--once-at", "2030-01-01T04:00+00:00", cwd=tmp_path)
    assert (out.returncode, out.stdout.strip()) == (0, "2030-01-07T03:00:00+00:00"), out.stderr
    out = cli("schedule", spec, "--dry-run", "--count", "2", cwd=tmp_path)
    assert out.returncode == 0 and len(out.stdout.split()) == 2


def test_schedule_without_cron_exits_2(tmp_path: Path) -> None:
    out = cli("schedule", str(write_spec(tmp_path, None)), "--dry-run", cwd=tmp_path)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rungwise: error: schedule.cron: not set"), err


def test_invalid_cron_is_refused_naming_schedule_cron(tmp_path: Path) -> None:
    out = cli("schedule", str(write_spec(tmp_path, "61 * * * *")), "--dry-run", cwd=tmp_path)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "schedule.cron" in err[0] and "'61 * * * *'" in err[0], err


def test_bad_once_at_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--once-at: not an ISO date-time"):
        parse_moment("tomorrow")
    assert parse_moment("2030-01-01T00:00").tzinfo is not None  # naive = local time


class FakeClock:
    """A clock that only moves when the scheduler naps or a run takes time."""

    def __init__(self, start: datetime) -> None:
        self.t = start

    def __call__(self) -> datetime:
        return self.t


class FakeStopper(Stopper):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def nap(self, seconds: float) -> bool:
        self.clock.t += timedelta(seconds=seconds)
        return self.event.is_set()


def test_loop_runs_each_slot_survives_failures_and_skips_overrun_slots() -> None:
    start = datetime(2030, 1, 1, 0, 3, tzinfo=UTC)
    clock = FakeClock(start)
    ran: list[tuple[datetime, list[str]]] = []
    codes = iter([1, 0, 0])

    def run(argv: list[str]) -> int:
        ran.append((clock.t, argv))
        if len(ran) == 2:
            clock.t += timedelta(minutes=15)  # overruns the 00:30 slot
        return next(codes)

    done = run_schedule("*/10 * * * *", ["retrain"], max_runs=3, stopper=FakeStopper(clock),
                        now=clock, run=run)
    assert done == 3
    assert [t.strftime("%H:%M") for t, _ in ran] == ["00:10", "00:20", "00:40"]


def test_stop_during_wait_ends_the_loop_without_running() -> None:
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
    stopper = FakeStopper(clock)
    stopper.event.set()
    assert run_schedule("0 3 * * *", ["x"], stopper=stopper, now=clock,
                        run=lambda argv: pytest.fail("ran")) == 0


def test_stop_forwards_sigterm_to_the_running_retrain() -> None:
    stopper = Stopper()
    timer = threading.Timer(1.0, stopper._stop, args=(signal.SIGTERM, None))
    timer.start()
    code = stopper.run([sys.executable, "-c", "import time; time.sleep(60)"])
    assert code == -signal.SIGTERM and stopper.event.is_set()


def test_sigterm_stops_the_waiting_scheduler_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "schedule",
                             str(write_spec(tmp_path, "0 3 1 1 *"))],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert "next retrain at" in first, first
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped after 0 run(s)" in out


def test_next_times_are_strictly_after_start() -> None:
    start = datetime(2030, 1, 1, 3, 0, tzinfo=UTC)
    assert next_times("0 3 * * *", start, 2) == [start + timedelta(days=1),
                                                  start + timedelta(days=2)]
