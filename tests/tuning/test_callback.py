"""The sweep's callbacks (tuning/callback.py), without Ray running: ``Live`` and statuses.

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


def test_a_trial_is_early_stopped_only_when_its_last_result_says_so(mlflow_uri: str) -> None:
    """The sweep tracker's statuses from fake trial results (as Ray tests its schedulers), into
    a real SQLite store: ``fit`` decides early stopping and says so in its last result; a
    trial that ended before its last epoch without saying so was stopped by the scheduler."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from tuning.callback import SweepTracker
    from tuning.tracking import RunLogger

    cl = MlflowClient(mlflow_uri)
    exp = cl.create_experiment("tracker")
    parent = cl.create_run(exp, run_name="sweep").info.run_id
    logger = RunLogger(mlflow_uri)
    tracker = SweepTracker(logger, exp, parent, "val_loss", max_epochs=10)
    reason = "train.early_stopping: val_loss did not improve on 0.3 (epoch 2) by more than 0 " \
             "for 2 epochs"
    lasts = {"patience": {"epoch": 4, "val_loss": 0.4, "stopped_early": 1, "stop_reason": reason},
             "asha": {"epoch": 4, "val_loss": 0.4},
             "full": {"epoch": 10, "val_loss": 0.2},
             "short": {"epoch": 5, "val_loss": 0.3}}  # train.epochs searched: 5 of 5 ran
    configs = {"short": {"train.epochs": 5}}
    for tid, last in lasts.items():
        trial = SimpleNamespace(trial_id=tid, config=configs.get(tid, {}), last_result=last,
                                error_file=None)
        tracker.on_trial_start(trial)
        for epoch in range(1, last["epoch"] + 1):
            tracker.on_trial_result(trial, {**last, "epoch": epoch})
        tracker.on_trial_complete(trial)
    logger.flush()
    logger.close()
    tags = {r.data.tags["rungwise.trial_id"]: r.data.tags
            for r in cl.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")}
    assert {tid: t["rungwise.status"] for tid, t in tags.items()} == {
        "patience": "early_stopped", "asha": "stopped_by_scheduler", "full": "finished",
        "short": "finished"}
    assert tags["patience"]["rungwise.stop_reason"] == reason
    assert tags["asha"]["rungwise.stopped_at_epoch"] == "4"
    assert "rungwise.stop_reason" not in tags["full"]


def test_a_trial_that_failed_before_it_started_is_a_failed_child_run(mlflow_uri: str) -> None:
    """Tune gives up a trial whose actor failed to start on every try (each placed on a node
    that had just died) with ``on_trial_error`` and no ``on_trial_start``: it is still a
    trial of the sweep, a FAILED child run with its error and parameters."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from tuning.callback import SweepTracker
    from tuning.tracking import RunLogger

    cl = MlflowClient(mlflow_uri)
    exp = cl.create_experiment("never-started")
    parent = cl.create_run(exp, run_name="sweep").info.run_id
    logger = RunLogger(mlflow_uri)
    tracker = SweepTracker(logger, exp, parent, "val_loss", max_epochs=3)
    ran = SimpleNamespace(trial_id="ran", config={"train.lr": 0.01}, last_result={"epoch": 3},
                          error_file=None)
    tracker.on_trial_start(ran)
    tracker.on_trial_complete(ran)
    lost = SimpleNamespace(trial_id="lost", config={"train.lr": 0.02}, last_result=None,
                           error_file=None, error_msg="The actor died because its node died.")
    tracker.on_trial_error(lost)
    logger.flush()
    logger.close()
    kids = {r.data.tags["rungwise.trial_id"]: r
            for r in cl.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")}
    assert sorted(kids) == ["lost", "ran"]
    assert kids["lost"].info.status == "FAILED"
    assert kids["lost"].data.tags["rungwise.status"] == "failed"
    assert "node died" in kids["lost"].data.tags["rungwise.error"]
    assert kids["lost"].data.params["train.lr"] == "0.02"
    assert kids["ran"].info.status == "FINISHED"
