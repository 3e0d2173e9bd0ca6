"""The Tune callback that mirrors a sweep in MLflow: one child run per trial, nested.

It runs in the driver (trials never talk to MLflow, so they may run on machines that cannot
reach the server), hands every write to ``RunLogger``'s background thread, and gives each
child run a final status that says what happened:

* ``finished``: ran all its epochs; ``early_stopped``: the trainer's patience ran out (its
  last result says so: ``stopped_early`` and ``stop_reason``, decided by ``fit`` alone);
* ``stopped_by_scheduler``: ASHA / HyperBand / median rule stopped it (tags: the epoch and
  the metric at the stop);
* ``diverged`` / ``failed``: the run is FAILED, with the reason as a tag.

A resumed sweep re-attaches: the child runs of the parent are looked up by trial id, so no
trial gets a second run. Steps already logged are not logged again.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from tuning.space import decode_config
from tuning.tracking import RunLogger, mask_secrets, mask_uri

TRIAL_TAG = "rungwise.trial_id"
INFO_TAGS = {"precision": "rungwise.precision", "nodes": "rungwise.nodes"}
"""Trial facts reported with each result and kept as tags on the trial's run."""
STATUS_TAG = "rungwise.status"
METRIC_KEYS = ("train_loss", "val_loss", "val_accuracy", "val_rmse", "lr", "epoch_time_s")


_LIVE: dict[str, Callback] = {}
_HOOKS = ("setup", "on_step_begin", "on_step_end", "on_trial_start", "on_trial_restore",
          "on_trial_save", "on_trial_result", "on_trial_complete", "on_trial_recover",
          "on_trial_error", "on_checkpoint", "on_experiment_end")


class Live(Callback):
    """A driver-side callback that survives ``Tuner.restore``.

    Tune pickles the run config (callbacks included) into the sweep's folder, and a restored
    Tuner uses those unpickled copies. ``Live`` pickles as its key only and forwards every
    Tune event to the callback registered under that key in this process: the resuming
    driver registers its own callbacks (same keys: the sweep's path) before it restores, so
    events reach the objects it reads afterwards. Without a registered callback (a resume
    without tracking), events go nowhere."""

    def __init__(self, key: str, target: Callback) -> None:
        self.key = key
        _LIVE[key] = target

    def __getstate__(self) -> dict[str, Any]:
        return {"key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.key = state["key"]

    def release(self) -> None:
        """The sweep ended: drop the registered callback."""
        _LIVE.pop(self.key, None)


def _forward(name: str) -> Any:
    def hook(self: Live, *args: Any, **kwargs: Any) -> None:
        target = _LIVE.get(self.key)
        if target is not None:
            getattr(target, name)(*args, **kwargs)

    hook.__name__ = name
    return hook


for _name in _HOOKS:
    setattr(Live, _name, _forward(_name))


class MlflowSweepCallback(Callback):
    """Tune's events -> the sweep's ``SweepTracker`` (wrap it in ``Live`` for resumes)."""

    def __init__(self, tracker: SweepTracker) -> None:
        self.tracker = tracker

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.tracker.on_trial_start(trial)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        self.tracker.on_trial_result(trial, result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        self.tracker.on_trial_complete(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.tracker.on_trial_error(trial)


class SweepTracker:
    def __init__(self, logger: RunLogger, experiment_id: str, parent_run_id: str,
                 metric: str, max_epochs: int) -> None:
        self.logger, self.exp, self.parent = logger, experiment_id, parent_run_id
        self.metric, self.max_epochs = metric, max_epochs
        self.runs: dict[str, str] = {}
        self.started: set[str] = set()
        """trial ids whose child run this driver has created or reopened"""
        self.logged_step: dict[str, int] = {}
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.curves: dict[str, list[tuple[int, float]]] = {}
        """trial id -> its (epoch, val_loss) points: the parent run's plot and trials.csv"""
        self.dataset_input: Any = None
        """the sweep's training data (tuning/lineage.py), logged on each child"""
        self.scheduler: Any = None
        """the live scheduler (set by the sweep): ASHA's rungs explain a stop"""
        self.mode = "min"
        self.rungs: dict[str, tuple[Any, Any, int]] = {}
        """trial id -> (rung, metric value, epoch) of the last rung it reached"""
        self._reattach()

    def _reattach(self) -> None:
        cl = self.logger.client
        runs = cl.search_runs([self.exp], f"tags.mlflow.parentRunId = '{self.parent}'",
                              max_results=5000)
        for run in runs:
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id:
                self.runs[trial_id] = run.info.run_id
                history = cl.get_metric_history(run.info.run_id, "val_loss")
                self.logged_step[trial_id] = max((m.step for m in history), default=0)
                self.curves[trial_id] = [(m.step, m.value) for m in history]

    # --- Tune events (through MlflowSweepCallback) -------------------------------------
    def on_trial_start(self, trial: Any) -> None:
        """Every MLflow write goes through the logger's thread, so a slow or absent server
        never blocks Tune's event loop; later writes find the run id when they run."""
        tid = trial.trial_id
        self.started.add(tid)
        if tid in self.runs:
            run_id = self.runs[tid]
            self.logger.submit(lambda c: c.update_run(run_id, status="RUNNING"))
            return
        params = mask_secrets({k: str(v) for k, v in decode_config(trial.config).items()})

        def create(c: Any) -> None:
            from tuning.tracking import params_of

            if tid not in self.runs:
                run = c.create_run(self.exp, run_name=f"trial-{tid}", tags={
                    "mlflow.parentRunId": self.parent, TRIAL_TAG: tid, STATUS_TAG: "running"})
                self.runs[tid] = run.info.run_id
                if self.dataset_input is not None:
                    c.log_inputs(self.runs[tid], datasets=[self.dataset_input])
            c.log_batch(self.runs[tid], params=params_of(params))

        self.logger.submit(create)

    def on_trial_result(self, trial: Any, result: dict[str, Any]) -> None:
        tid, epoch = trial.trial_id, int(result.get("epoch", 0) or 0)
        if self.scheduler is not None:
            from tuning.rungs import rung_reached

            rung = rung_reached(self.scheduler, tid, epoch)
            if rung is not None and rung.milestone == epoch:
                self.rungs[tid] = (rung, result.get(self.metric), epoch)
        if epoch <= self.logged_step.get(tid, 0):
            return
        self.logged_step[tid] = epoch
        values = {k: result[k] for k in METRIC_KEYS if k in result}
        self.logger.metrics(lambda: self.runs.get(tid), values, epoch)
        if "val_loss" in result:
            self.curves.setdefault(tid, []).append((epoch, float(result["val_loss"])))

    def on_trial_complete(self, trial: Any) -> None:
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0) or 0)
        # the trial's own budget: train.epochs may be a dimension of the space
        epochs = int(decode_config(trial.config).get("train.epochs", self.max_epochs))
        if last.get("diverged"):
            self._end(trial, "FAILED", "diverged", {"rungwise.error": str(last.get("error"))})
        elif epoch < epochs and last.get("stopped_early"):
            self._end(trial, "FINISHED", "early_stopped",
                      {"rungwise.epochs": str(epoch),
                       "rungwise.stop_reason": str(last.get("stop_reason", ""))})
        elif epoch < epochs:
            value = last.get(self.metric)
            self._end(trial, "FINISHED", "stopped_by_scheduler",
                      {"rungwise.stopped_at_epoch": str(epoch),
                       "rungwise.stopped_metric": f"{self.metric}={value}",
                       "rungwise.stop_reason": self._stop_reason(trial.trial_id, value, epoch)})
        else:
            self._end(trial, "FINISHED", "finished", {"rungwise.epochs": str(epoch)})

    def _stop_reason(self, tid: str, value: Any, epoch: int) -> str:
        from tuning.rungs import stop_sentence

        rung, at_rung, rung_epoch = self.rungs.get(tid, (None, value, epoch))
        if rung is not None and rung_epoch != epoch:  # stopped later, not by a rung
            rung, at_rung = None, value
        return stop_sentence(rung, self.metric, at_rung, epoch, self.mode)

    def on_trial_error(self, trial: Any) -> None:
        if trial.trial_id not in self.started:
            # its actor never started (e.g. each try was placed on a node that had just
            # died): Tune gives it up without on_trial_start, but it is still a trial
            self.on_trial_start(trial)
        error = _error_text(trial)
        self._end(trial, "FAILED", "failed", {"rungwise.error": error})

    def _end(self, trial: Any, status: str, outcome: str, tags: dict[str, str]) -> None:
        tid = trial.trial_id
        self.outcomes[tid] = {"status": outcome, **tags}
        all_tags = {STATUS_TAG: outcome, **tags}
        last = trial.last_result or {}
        for key, tag in INFO_TAGS.items():  # e.g. bf16-autocast or fp32; nodes of the ranks
            if last.get(key) is not None:
                all_tags[tag] = str(last[key])
        end = int(time.time() * 1000)

        def write(c: Any) -> None:
            run_id = self.runs.get(tid)
            if run_id is None:
                return
            lost = self.logger.lost.get(run_id)
            if lost:
                all_tags["rungwise.lost_metrics"] = f"{lost} values could not be sent"
            for key, value in all_tags.items():
                c.set_tag(run_id, key, mask_uri(value)[:5000])
            c.set_terminated(run_id, status, end_time=end)

        self.logger.submit(write)

    def end_all(self, status: str = "KILLED") -> None:
        """Mark every child still open (the sweep ended before them) with ``status``."""
        def write(c: Any) -> None:
            for tid, run_id in list(self.runs.items()):
                if tid not in self.outcomes:
                    c.set_tag(run_id, STATUS_TAG, status.lower())
                    c.set_terminated(run_id, status)

        self.logger.submit(write)
        self.logger.flush()


def _error_text(trial: Any) -> str:
    try:
        path = trial.error_file or ""
        if path:
            with open(path) as fh:
                lines = [ln.strip() for ln in fh.read().strip().splitlines() if ln.strip()]
            return lines[-1][:1000] if lines else "unknown error"
    except OSError:
        pass
    return str(getattr(trial, "error_msg", None) or "unknown error")[:1000]
