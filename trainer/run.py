"""One training run from the spec's model + train sections and prepared data.

Used as is by `rungwise train`, by every Ray Tune trial and by every Ray Train worker: the
side effects (reporting, checkpointing, logging) come in through ``on_epoch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.bundle import ModelBundle
from trainer.loop import FitResult, OnEpoch, TensorData, evaluate, fit
from trainer.models import explain_oom, is_oom, new_model
from trainer.pipeline import Prepared


@dataclass
class RunResult:
    fit: FitResult
    test_metrics: dict[str, float]
    bundle: ModelBundle


def tensors_of(prepared: Prepared) -> TensorData:
    return TensorData.from_prepared(prepared)


def make_bundle(model_spec: Any, prepared: Prepared, net: torch.nn.Module,
                metrics: dict[str, float] | None = None) -> ModelBundle:
    spec_dict = model_spec.model_dump() if hasattr(model_spec, "model_dump") else dict(
        vars(model_spec))
    pre = prepared.preprocessor
    features = list(getattr(pre.imputer, "feature_names_in_", [])) if hasattr(
        pre, "imputer") else []
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return ModelBundle(preprocessor=pre, model_spec=spec_dict,
                       input_shape=prepared.input_shape,
                       n_outputs=prepared.n_outputs,
                       task=prepared.task, state_dict=state, feature_columns=features,
                       metrics=dict(metrics or {}))


def test_metrics(net: torch.nn.Module, data: TensorData) -> dict[str, float]:
    return evaluate(net, data.x_test, data.y_test, data, prefix="test_")


def train_run(model_spec: Any, train_spec: Any, prepared: Prepared,
              on_epoch: OnEpoch | None = None, checkpoint: dict[str, Any] | None = None,
              checkpoint_every: int = 0) -> RunResult:
    """Build, fit (restoring the best epoch), evaluate on the test split, bundle."""
    data = tensors_of(prepared)
    try:
        net = new_model(model_spec, prepared, seed=train_spec.seed)
        result = fit(net, data, train_spec, on_epoch=on_epoch, checkpoint=checkpoint,
                     checkpoint_every=checkpoint_every)
    except Exception as exc:
        if is_oom(exc):
            raise explain_oom(exc, model_spec, train_spec, int(data.x_train[0].numel())) from None
        raise
    metrics = test_metrics(result.model, data)
    return RunResult(fit=result, test_metrics=metrics,
                     bundle=make_bundle(model_spec, prepared, result.model, metrics))
