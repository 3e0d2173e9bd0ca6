"""From a finished Tune ResultGrid to the best model, evaluated on the untouched test split."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.bundle import ModelBundle
from trainer.checkpoint import load_checkpoint
from trainer.data import SplitData
from trainer.pipeline import Prepared, prepare
from trainer.run import Hooks, train_run
from tuning.config import SweepSpec
from tuning.errors import RungwiseError
from tuning.space import decode_config, variant_key
from tuning.trainable import CKPT_FILE


@dataclass
class Evaluated:
    trial_id: str
    overrides: dict[str, Any]
    metric: str
    value: float
    test_metrics: dict[str, float]
    bundle: ModelBundle
    example: Any


def _best_value(result: Any, metric: str, mode: str) -> float | None:
    df = result.metrics_dataframe
    if result.error is not None or df is None or metric not in df or df.empty:
        return None
    if "diverged" in df and (df["diverged"] == 1).any():
        return None
    values = [v for v in df[metric].tolist() if isinstance(v, int | float) and math.isfinite(v)]
    if not values:
        return None
    return min(values) if mode == "min" else max(values)


def best_trial(grid: Any, metric: str, mode: str) -> tuple[Any, float]:
    """The trial with the best value of ``metric`` at any epoch; failed/diverged excluded."""
    scored = [(r, v) for r in grid if (v := _best_value(r, metric, mode)) is not None]
    if not scored:
        errors = [str(r.error).splitlines()[0] for r in grid if r.error is not None][:1]
        raise RungwiseError(f"sweep: no trial produced a usable {metric} (all "
                            f"{len(grid)} failed or diverged){': ' + errors[0] if errors else ''}")
    pick = min if mode == "min" else max
    return pick(scored, key=lambda rv: rv[1])


def _checkpoint_dir(result: Any) -> Any:
    """The trial's latest checkpoint: Tune's own, or Ray Train's path for a DDP trial."""
    if result.checkpoint is not None:
        return result.checkpoint
    df = result.metrics_dataframe
    if df is not None and "checkpoint_path" in df:
        paths = [p for p in df["checkpoint_path"].tolist() if isinstance(p, str) and p]
        if paths:
            from ray.train import Checkpoint

            # a path in the storage's file system (a bucket key has no scheme): the same
            # file system the trial's results came from
            return Checkpoint(paths[-1], filesystem=result.filesystem)
    raise RungwiseError("sweep: the best trial left no checkpoint to build the model from")


def evaluate_best(spec: SweepSpec, best: tuple[Any, float], raw: SplitData,
                  local: dict[str, Prepared]) -> Evaluated:
    """The best trial's model: ``train_run`` resumed from its last checkpoint with nothing
    left to train restores the best epoch's weights, evaluates them on the test split and
    bundles them with the fitted preprocessor."""
    result, value = best
    overrides = decode_config(result.config)
    # the driver evaluates on its CPU, as the served model predicts: a GPU the trials had
    # may not be here
    tspec = spec.with_overrides({**overrides, "train.device": "cpu"})
    # an imputation choice the driver did not enumerate was fitted inside the trial: the
    # driver fits it again (same data, same seed) for the model's preprocessor
    prepared = local.get(variant_key(overrides)) or prepare(raw, tspec.impute)
    with _checkpoint_dir(result).as_directory() as d:
        state = load_checkpoint(Path(d) / CKPT_FILE)
    run = train_run(tspec.model, tspec.train, prepared,
                    Hooks(resume_from=state, until_epoch=int(state["epoch"])))
    assert run.bundle is not None  # a Prepared has its preprocessor
    trial_id = str(result.metrics.get("trial_id", ""))
    return Evaluated(trial_id=trial_id, overrides=overrides, metric=spec.tune.metric,
                     value=float(value), test_metrics=run.test_metrics, bundle=run.bundle,
                     example=prepared.example)
