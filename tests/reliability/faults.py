"""Test-only fault injection into real trials: a wrapper around the product's trainable.

``crashing(fault, folder)`` returns a Tune function trainable that runs
``tuning.trainable.run_trial`` unchanged, except that while it runs, ``ray.tune.report``
raises for the chosen trials when they report the chosen epoch: the same place a crash in
``on_epoch`` would come from, before that epoch's result and checkpoint reach Tune. The
crash is a real exception in a real trial process; Tune's retry restores the trial from its
real last checkpoint. Install it with ``monkeypatch.setattr(tuning.sweep, "run_trial", ...)``:
the driver pickles it (a closure) into the trials, so it reaches the workers of a Ray that
is already running. Nothing of this is in the product.

``fault`` is ``crash:RATE:EPOCH[:always]``: the share RATE of trials crash at EPOCH, once (the
retry from the last checkpoint then succeeds) or on every attempt. Trials are numbered in the
order they first start (claim files in ``folder``), and trial n is chosen when
floor((n+1)*RATE) > floor(n*RATE): exactly floor(N*RATE) of the first N trials crash, whatever
their random ids. Use a fresh folder per sweep. The file ``rungwise-fault-crashed-<trial id>``
records each injected crash, one line per attempt.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def crashing(fault: str, folder: Path) -> Callable[[dict[str, Any], Any], None]:
    def hooked(trial_id: str, report: Callable[..., None]) -> Callable[..., None]:
        hook = crash_hook(fault, folder, trial_id)

        def report_or_crash(metrics: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            hook(int(metrics.get("epoch", 0)))
            report(metrics, *args, **kwargs)

        return report_or_crash

    return with_report(hooked)


def with_report(wrap: Callable[[str, Callable[..., None]], Callable[..., None]]
                ) -> Callable[[dict[str, Any], Any], None]:
    """A Tune function trainable that runs ``tuning.trainable.run_trial`` unchanged while
    ``ray.tune.report`` is ``wrap(trial id, the real report)`` (one trial at a time per
    process: Tune's actors)."""
    from tuning.trainable import run_trial as real

    def run_trial(config: dict[str, Any], shared: Any) -> None:
        import ray.tune

        report = ray.tune.report
        ray.tune.report = wrap(ray.tune.get_context().get_trial_id(), report)
        try:
            real(config, shared)
        finally:
            ray.tune.report = report

    return run_trial


def crash_hook(fault: str, folder: Path, trial_id: str) -> Callable[[int], None]:
    _, rate, at, *mode = fault.split(":")
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"rungwise-fault-crashed-{trial_id}"
    n = arrival(folder, trial_id)
    chosen = math.floor((n + 1) * float(rate) + 1e-9) > math.floor(n * float(rate) + 1e-9)
    always = mode == ["always"]

    def hook(epoch: int) -> None:
        if chosen and epoch == int(at) and (always or not marker.exists()):
            with marker.open("a") as fh:
                fh.write(f"crashed at epoch {epoch}\n")
            raise RuntimeError(f"injected fault at epoch {epoch} (test hook)")

    return hook


def arrival(folder: Path, trial_id: str) -> int:
    """This trial's number in arrival order: the first free ``rungwise-fault-claim-<k>``
    file, taken atomically (O_EXCL), so that concurrent trials never share a number."""
    mine = folder / f"rungwise-fault-seq-{trial_id}"
    if mine.exists():
        return int(mine.read_text())
    n = 0
    while True:
        try:
            fd = os.open(folder / f"rungwise-fault-claim-{n:05d}",
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            n += 1
            continue
        os.write(fd, trial_id.encode())
        os.close(fd)
        break
    mine.write_text(str(n))
    return n


def held_until(signal_file: Path, timeout: float = 300) -> Callable[[dict[str, Any], Any], None]:
    """A trainable as ``with_report`` makes, whose every ``ray.tune.report`` waits until
    ``signal_file`` exists (or ``timeout`` passes). A test that creates the file when it has done
    what it waits to do (stop a server) then knows every epoch is reported after that, however
    fast the machine."""
    def held(trial_id: str, report: Callable[..., None]) -> Callable[..., None]:
        def report_when_released(metrics: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            import time

            deadline = time.time() + timeout
            while not signal_file.exists() and time.time() < deadline:
                time.sleep(0.1)
            report(metrics, *args, **kwargs)

        return report_when_released

    return with_report(held)
