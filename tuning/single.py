"""One training run tracked in MLflow, no Ray involved: `rungwise train` and a refit retrain.

Both call ``trainer.run.train_run`` with an ``on_epoch`` hook that logs each epoch to one
MLflow run; params, the training data's lineage, the test metrics and the model go to the
same run, and a refit also registers the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.loop import STOP_KEYS
from trainer.run import Hooks, RunResult, train_run
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


@dataclass
class Tracked:
    """How a caller labels its run: ``rungwise train`` by default."""

    run_name: str = ""
    tags: dict[str, str] = field(default_factory=lambda: {"rungwise.kind": "train"})
    params: dict[str, Any] = field(default_factory=dict)
    """Logged besides the spec's own (a refit's ``best.*`` configuration)."""
    dataset: Any = None
    """The MLflow dataset input of the training split (default: from ``prepared``)."""
    register_as: str | None = None
    """Register the model under this name (``challenger``; ``champion`` if none)."""


@dataclass
class TrackedResult:
    result: RunResult
    run_id: str
    uri: str
    """The tracking URI, password masked."""
    version: str | None = None


def tracked_run(spec: Any, prepared: Any, how: Tracked | None = None) -> TrackedResult:
    """Train once; params, per-epoch and final metrics, and the model go to one MLflow run."""
    how = how or Tracked()
    uri = resolve_tracking_uri(spec.tracking.uri)
    check_reachable(uri)
    logger = RunLogger(uri)
    cl = logger.client
    exp = experiment_id(cl, spec.tracking.experiment or spec.name)
    run = cl.create_run(exp, run_name=how.run_name or f"train-{spec.name}",
                        tags={**how.tags, "rungwise.data_fingerprint": prepared.fingerprint})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        log_params(cl, run_id, {**spec.flat(), **how.params})
        log_training_input(cl, run_id, how.dataset or from_prepared(spec.data, prepared))

        def on_epoch(metrics: dict[str, Any], _ckpt: Any) -> None:
            values = {k: v for k, v in metrics.items() if k not in STOP_KEYS}
            logger.metrics(run_id, values, int(metrics["epoch"]))

        result = train_run(spec.model, spec.train, prepared, Hooks(on_epoch=on_epoch))
        logger.metrics(run_id, {**result.test_metrics, "best_epoch": result.fit.best_epoch},
                       result.fit.epochs_run)
        cl.set_tag(run_id, "rungwise.precision", result.fit.precision)
        logger.flush()
        assert result.bundle is not None  # a Prepared has its preprocessor
        model_uri = registry.log_bundle(run_id, result.bundle, prepared.example, uri)
        version = registry.register(uri, model_uri, how.register_as, run_id)[0] \
            if how.register_as else None
        status = "FINISHED"
        return TrackedResult(result, run_id, mask_uri(uri), version)
    except BaseException as exc:
        cl.set_tag(run_id, "rungwise.error",
                   f"{type(exc).__name__}: {mask_uri(str(exc))[:500]}")
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        logger.close()
        cl.set_terminated(run_id, status)
