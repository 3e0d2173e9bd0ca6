"""Why ASHA stopped a trial, read from the live scheduler in the driver.

Ray's ``AsyncHyperBandScheduler`` keeps, per bracket, its rungs as ``(milestone, {trial_id:
reward})`` and stops a trial reaching a rung when its reward is below ``bracket.cutoff`` of
the rewards recorded there before it (reward = metric for ``max``, -metric for ``min``). Tune
asks the scheduler first and calls the callbacks after, with the same result: so when
``rung_reached`` runs from a callback's ``on_trial_result``, the trial's own value has just
been recorded, and the cutoff it had to beat is ``bracket.cutoff`` over the others.

Only that state is read (``_brackets``, ``_rungs``, ``_metric_op`` and the bracket's own
``cutoff`` method, so the percentile rule is Ray's, not a copy); every access is guarded, and
a layout this module does not recognise gives ``None``, never an error in the sweep.
tests/tuning/test_explain.py runs a real ASHA sweep and checks the sentence, so a Ray upgrade
that moves this state fails a test rather than silently dropping the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rung:
    index: int
    """1-based, from the first (lowest) milestone"""
    milestone: float
    cutoff: float | None
    """in the metric's own units; None when the trial was the first at the rung"""
    others: int
    """trials recorded at the rung before this one"""


def rung_reached(scheduler: Any, trial_id: str, iteration: int) -> Rung | None:
    """The rung ``trial_id`` was just recorded at (by a result at ``iteration``), or None."""
    try:
        sign = float(scheduler._metric_op)
        for bracket in scheduler._brackets:
            rungs = list(bracket._rungs)  # highest milestone first
            for pos, (milestone, recorded) in enumerate(rungs):
                if trial_id not in recorded or milestone > iteration:
                    continue
                others = {k: v for k, v in recorded.items() if k != trial_id}
                cut = bracket.cutoff(others)
                cutoff = None if cut is None else float(cut) * sign
                if cutoff is not None and not math.isfinite(cutoff):
                    cutoff = None
                return Rung(len(rungs) - pos, float(milestone), cutoff, len(others))
    except (AttributeError, TypeError, ValueError):
        return None
    return None


def _apart(value: Any, cutoff: float) -> tuple[str, str]:
    """Both numbers to 4 significant digits, or as many more as it takes to tell them apart."""
    from tuning.display import short

    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value), short(cutoff)
    digits = 4
    while f"{v:.{digits}g}" == f"{cutoff:.{digits}g}" and digits < 17:
        digits += 1
    return f"{v:.{digits}g}", f"{cutoff:.{digits}g}"


def stop_sentence(rung: Rung | None, metric: str, value: Any, epoch: int, mode: str) -> str:
    """One sentence for the ``rungwise.stop_reason`` tag of a trial the scheduler stopped."""
    from tuning.display import short

    if rung is None or rung.cutoff is None:
        return (f"Stopped by the scheduler after epoch {epoch} with {metric} {short(value)} "
                "(its rung state was not readable).")
    worse = "above" if mode == "min" else "below"
    shown, cut = _apart(value, rung.cutoff)
    return (f"Stopped at rung {rung.index} (epoch {rung.milestone:g}): {metric} "
            f"{shown} was {worse} the cutoff {cut} set by the "
            f"{rung.others} trial{'s' if rung.others != 1 else ''} already at that rung.")
