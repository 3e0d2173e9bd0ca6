"""One training run: build the spec's model for prepared data, fit it, evaluate it, bundle it.

``train_run`` is the only place that builds and trains one model (packed trials, many models
at once, train in ``trainer/packed.py``, which reproduces ``fit``'s early-stopping rule and stop
keys and is tested member by member against it). Its callers differ only in the hooks they pass:

* ``rungwise train`` and a refit retrain (tuning/single.py): ``on_epoch`` logs to MLflow;
* a single-process Ray Tune trial (tuning/trainable.py): ``on_epoch`` reports to Tune and
  saves checkpoints; ``resume_from`` is Tune's checkpoint after a retry or a pause;
* each rank of a Ray Train DDP trial: the same, with ``wrap`` = DistributedDataParallel;
* the best trial's evaluation after a sweep (tuning/results.py): ``resume_from`` is its last
  checkpoint and ``until_epoch`` that checkpoint's epoch, so it trains no further and only
  restores the best weights, evaluates them on the test split and bundles them.

Out-of-memory errors of any of them become one ``OutOfMemory`` line here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from trainer.config import ModelSpec, TrainSpec
from trainer.loop import FitResult, OnEpoch, TensorData, evaluate, fit
from trainer.models import explain_oom, is_oom, new_model

if TYPE_CHECKING:  # pandas and scikit-learn: never imported by a trial worker
    from trainer.arrays import ArrayData
    from trainer.bundle import ModelBundle
    from trainer.pipeline import Prepared


@dataclass
class Hooks:
    """What a caller plugs into ``train_run``; every field is optional."""

    on_epoch: OnEpoch | None = None
    """``on_epoch(metrics, ckpt)`` after every epoch (see ``trainer.loop.fit``)."""
    checkpoint_every: int = 0
    """Offer ``on_epoch`` a checkpoint every this many epochs (0: never)."""
    resume_from: dict[str, Any] | None = None
    """A checkpoint to continue from (a dict that ``on_epoch``'s ``ckpt()`` returned)."""
    until_epoch: int | None = None
    """Stop at this epoch (default ``train.epochs``)."""
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    """Applied to the fresh model before training, e.g. DistributedDataParallel."""
    gpu_share: float = 0.0
    """The share of a GPU the run was given, named in an out-of-memory message."""


@dataclass
class RunResult:
    fit: FitResult
    test_metrics: dict[str, float]
    """Empty when the run was not asked to evaluate (a trial never sees the test split)."""
    bundle: ModelBundle | None
    """Imputer + encoder + weights; None without a preprocessor or evaluation."""


def train_run(model_spec: ModelSpec, train_spec: TrainSpec, data: Prepared | ArrayData,
              hooks: Hooks | None = None, *, evaluate_test: bool = True) -> RunResult:
    """Build, fit (restoring the best epoch), and with ``evaluate_test`` evaluate on the test
    split and bundle with the preprocessor (when ``data`` has one)."""
    hooks = hooks or Hooks()
    tensors = TensorData.from_prepared(data)
    with explained_oom(model_spec, train_spec, data, hooks.gpu_share):
        net = build(model_spec, train_spec, data)
        model = hooks.wrap(net) if hooks.wrap is not None else net
        result = fit(model, tensors, train_spec, on_epoch=hooks.on_epoch,
                     checkpoint=hooks.resume_from, checkpoint_every=hooks.checkpoint_every,
                     until_epoch=hooks.until_epoch)
    if not evaluate_test:
        return RunResult(fit=result, test_metrics={}, bundle=None)
    metrics = test_metrics(net, tensors)
    # arrays only (a trial's ArrayData) have no preprocessing to bundle; Prepared is not
    # imported here (pandas), hence the attribute test
    bundle = make_bundle(model_spec, cast("Prepared", data), net, metrics) \
        if hasattr(data, "preprocessor") else None
    return RunResult(fit=result, test_metrics=metrics, bundle=bundle)


def build(model_spec: ModelSpec, train_spec: TrainSpec, data: Any) -> torch.nn.Module:
    """The spec's network for ``data``, seeded by ``train.seed``; OOM explained."""
    with explained_oom(model_spec, train_spec, data):
        return new_model(model_spec, data, seed=train_spec.seed)


@contextmanager
def explained_oom(model_spec: ModelSpec, train_spec: TrainSpec, data: Any,
                  gpu_share: float = 0.0) -> Iterator[None]:
    """The one place where running out of memory becomes a one-line ``OutOfMemory``."""
    try:
        yield
    except Exception as exc:
        if not is_oom(exc):
            raise
        raise explain_oom(exc, model_spec, train_spec, int(data.x_train[0].size),
                          gpu_share=gpu_share, data_bytes=data_bytes(data)
                          if gpu_share else 0) from None


def data_bytes(data: Any) -> int:
    """What the splits take on a device (features float32, as the arrays are)."""
    return sum(int(getattr(data, f"{a}_{s}").nbytes) for a in "xy"
               for s in ("train", "val", "test"))


def make_bundle(model_spec: ModelSpec, prepared: Prepared, net: torch.nn.Module,
                metrics: dict[str, float] | None = None) -> ModelBundle:
    from trainer.bundle import ModelBundle

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
