"""`rungwise train`: one training run of the spec's values, logged to MLflow as one run."""

from __future__ import annotations

import time
from typing import Any

from jobs.spec import JobSpec
from trainer.memory import check_fits, machine_memory
from trainer.pipeline import load_and_prepare
from trainer.run import RunResult, build, train_run


def train_command(spec: JobSpec, tracking: bool = True) -> int:
    t0 = time.perf_counter()
    prepared = load_and_prepare(spec.data, spec.impute)
    available = machine_memory()
    if available:  # a run that cannot fit is refused before it starts
        check_fits(spec.model, spec.train, prepared.input_shape, prepared.n_outputs, available,
                   "this machine")
    # a model that does not fit the data, or memory, fails before MLflow is touched
    build(spec.model, spec.train, prepared)
    if not tracking:
        result = train_run(spec.model, spec.train, prepared)
        _summary(spec, result, prepared, time.perf_counter() - t0, None)
        return 0
    from tuning.single import tracked_run

    done = tracked_run(spec, prepared)
    _summary(spec, done.result, prepared, time.perf_counter() - t0, (done.run_id, done.uri))
    return 0


def _summary(spec: JobSpec, result: RunResult, prepared: Any, seconds: float,
             run: tuple[str, str] | None) -> None:
    from tuning.display import pairs, short

    fit = result.fit
    how = "stopped early (patience)" if fit.stopped_early else "ran all epochs"
    print(f"{spec.name}: {fit.epochs_run} epochs ({how}), best epoch {fit.best_epoch}, "
          f"best val_loss {short(fit.best_val_loss)}, {seconds:.1f} s")
    print(f"data: {prepared.info.get('rows_train')} train / {prepared.info.get('rows_val')} val "
          f"/ {prepared.info.get('rows_test')} test rows, "
          f"{prepared.x_train.shape[1:]} inputs")
    print("test: " + pairs(result.test_metrics, sep="  "))
    if run is not None:
        print(f"mlflow: run {run[0]} in experiment '{spec.tracking.experiment or spec.name}' "
              f"at {run[1]}  (see it with: mlflow ui --backend-store-uri {run[1]})")
