"""Callbacks that survive ``Tuner.restore`` (tuning/callback.py ``Live``), without Ray running.

Tune pickles the run config into the sweep's folder and a restored Tuner uses the unpickled
callbacks; ``Live`` pickles as a key, so the copy reaches the resuming driver's own object."""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune import Callback

from tuning.callback import Live


class Seen(Callback):
    def __init__(self) -> None:
        self.started: list[str] = []

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.started.append(trial)


def test_an_unpickled_live_callback_reaches_the_object_registered_now() -> None:
    first = Seen()
    live = Live("sweep-a#progress", first)
    blob = pickle.dumps(live)  # what Tune writes into tuner.pkl
    assert b"Seen" not in blob  # the key only, not the driver's object
    live.on_trial_start(iteration=0, trials=[], trial="t0")
    assert first.started == ["t0"]

    resumed = Seen()  # the resuming driver registers its own object under the same key
    Live("sweep-a#progress", resumed)
    restored = pickle.loads(blob)  # what Tuner.restore hands Tune
    restored.on_trial_start(iteration=1, trials=[], trial="t1")
    assert resumed.started == ["t1"] and first.started == ["t0"]

    restored.release()  # the sweep ended: events go nowhere, nothing raises
    restored.on_trial_start(iteration=2, trials=[], trial="t2")
    assert resumed.started == ["t1"]
