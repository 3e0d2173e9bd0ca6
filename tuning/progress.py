"""A terse live view of a sweep on the terminal: one line per trial event, a status line
every few seconds (running / done / best so far)."""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from tuning.config import SweepSpec
from tuning.display import pairs, short
from tuning.space import decode_config


class ProgressCallback(Callback):
    def __init__(self, spec: SweepSpec, strategy: Any, quiet: bool = False, every_s: float = 10.0):
        self.metric, self.mode = spec.tune.metric, spec.tune.mode
        self.total = strategy.num_samples
        self.quiet, self.every_s = quiet, every_s
        self.started: set[str] = set()
        self.ended: dict[str, str] = {}
        self.best: tuple[float, str, int] | None = None
        self._last = 0.0
        self._t0 = time.time()

    def _say(self, text: str) -> None:
        if not self.quiet:
            from tuning.secrets import mask_uri  # trial configs may hold URIs

            print(f"[{time.time() - self._t0:6.0f}s] {mask_uri(text)}", file=sys.stdout,
                  flush=True)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.started.add(trial.trial_id)
        params = pairs(decode_config(trial.config))
        self._say(f"trial {trial.trial_id} started: {params}")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and not result.get("diverged"):
            better = self.best is None or (value < self.best[0] if self.mode == "min"
                                           else value > self.best[0])
            if better:
                self.best = (float(value), trial.trial_id, int(result.get("epoch", 0)))
        if time.time() - self._last >= self.every_s:
            self._last = time.time()
            self._say(self.status(trials))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        last = trial.last_result or {}
        how = "ended"
        if last.get("diverged"):
            how = "diverged"
        self.ended[trial.trial_id] = how
        self._say(f"trial {trial.trial_id} {how} at epoch {last.get('epoch')}: "
                  f"{self.metric}={short(last.get(self.metric))}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = "failed"
        self._say(f"trial {trial.trial_id} FAILED (see its MLflow run for the error)")

    def status(self, trials: list[Any]) -> str:
        running = sum(1 for t in trials if t.status == "RUNNING")
        best = (f"best {self.metric}={short(self.best[0])} (trial {self.best[1]}, epoch "
                f"{self.best[2]})" if self.best else "no result yet")
        return f"running {running}, ended {len(self.ended)}/{self.total}; {best}"

    def interrupted(self) -> bool:
        """Some trial started and never ended: the sweep was stopped (Ctrl-C, SIGTERM)."""
        return bool(self.started - set(self.ended))
