"""A single training run tracked in MLflow (`rungwise train`): no Ray involved."""

from __future__ import annotations

from typing import Any

from trainer.run import RunResult, train_run
from tuning import registry
from tuning.lineage import from_prepared, log_training_input
from tuning.tracking import (
    RunLogger,
    check_reachable,
    experiment_id,
    log_params,
    mask_uri,
    resolve_tracking_uri,
)


def tracked_run(spec: Any, prepared: Any) -> tuple[RunResult, str, str]:
    """Train once; params, per-epoch and final metrics, and the model go to one MLflow run."""
    uri = resolve_tracking_uri(spec.tracking.uri)
    check_reachable(uri)
    logger = RunLogger(uri)
    cl = logger.client
    exp = experiment_id(cl, spec.tracking.experiment or spec.name)
    run = cl.create_run(exp, run_name=f"train-{spec.name}",
                        tags={"rungwise.kind": "train", "rungwise.data_fingerprint":
                              prepared.fingerprint})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        log_params(cl, run_id, spec.flat())
        log_training_input(cl, run_id, from_prepared(spec.data, prepared))
        result = train_run(spec.model, spec.train, prepared,
                           on_epoch=lambda m, _c: logger.metrics(run_id, m, int(m["epoch"])))
        logger.metrics(run_id, {**result.test_metrics, "best_epoch": result.fit.best_epoch},
                       result.fit.epochs_run)
        cl.set_tag(run_id, "rungwise.precision", result.fit.precision)
        logger.flush()
        registry.log_bundle(run_id, result.bundle, prepared.example, uri)
        status = "FINISHED"
        return result, run_id, mask_uri(uri)
    except BaseException as exc:
        cl.set_tag(run_id, "rungwise.error",
                   f"{type(exc).__name__}: {mask_uri(str(exc))[:500]}")
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        logger.close()
        cl.set_terminated(run_id, status)
