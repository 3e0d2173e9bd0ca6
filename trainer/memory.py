"""How much memory one training run needs, known before it starts: weights, gradients,
optimiser state and one batch's activations, computed from the model and train sections and
the data's shape without building anything. ``explain_oom`` (after the fact) and the checks
before a run or a sweep (``check_fits``) use this one estimate."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from trainer.config import ModelSpec, TrainSpec
from trainer.models import OutOfMemory

FLOAT = 4  # bytes: weights, gradients and activations are float32
OPTIMIZER_STATE: dict[str, int] = {"sgd": 1, "adam": 2, "adamw": 2}
"""Buffers per weight: momentum; first and second moments (a key per ``OPTIMIZERS``)."""


@dataclass(frozen=True)
class Estimate:
    parameters: int
    weights: int  # bytes
    training_state: int  # gradients + optimiser state, bytes
    activations: int  # one batch, forward + backward, bytes

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.activations


def _layers(cfg: ModelSpec, shape: tuple[int, ...],
            n_outputs: int) -> tuple[int, int, int]:
    """(conv parameters, dense parameters, activation floats per example) of the network
    that ``build_model`` builds."""
    params, acts = 0, math.prod(shape)
    if cfg.kind == "cnn" and len(shape) > 1:
        c_in, h, w = (1, *shape) if len(shape) == 2 else shape
        for c_out in map(int, cfg.channels):
            params += (c_in * cfg.kernel_size ** 2 + 1) * c_out
            acts += 2 * c_out * h * w  # conv output, activation output
            if cfg.pool != "none" and min(h, w) >= 2:
                h, w = h // 2, w // 2
                acts += c_out * h * w
            c_in = c_out
        n_in = c_in * h * w
    else:
        n_in = math.prod(shape)
    conv, params = params, 0
    per_layer = 3 if cfg.dropout > 0 else 2  # linear output, activation (, dropout mask)
    for size in (*map(int, cfg.hidden), n_outputs):
        params += (n_in + 1) * size
        acts += per_layer * size
        n_in = size
    return conv, params, acts


def estimate(model_spec: ModelSpec, train_spec: TrainSpec, input_shape: tuple[int, ...],
             n_outputs: int) -> Estimate:
    """The memory of one run of ``model_spec`` at ``train_spec.batch_size`` on one device."""
    conv, dense, acts = _layers(model_spec, tuple(input_shape), n_outputs)
    params = conv + dense
    state = 1 + OPTIMIZER_STATE[train_spec.optimizer]
    batch = train_spec.batch_size
    return Estimate(parameters=params, weights=params * FLOAT,
                    training_state=state * params * FLOAT,
                    activations=2 * batch * acts * FLOAT)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(model_spec: ModelSpec, train_spec: TrainSpec, input_shape: tuple[int, ...],
               n_outputs: int, available: int, where: str,
               names: dict[str, str] | None = None) -> Estimate:
    """Raise ``OutOfMemory`` (one line naming the key) when a run cannot fit ``available``
    bytes; ``where`` says whose memory that is. The key named is ``train.batch_size`` when
    activations dominate, else the model's layers; ``names`` may replace how a key is named
    (``{"model.hidden": "tune.space.model.hidden: the choice [...]"}``)."""
    est = estimate(model_spec, train_spec, input_shape, n_outputs)
    if est.total <= available:
        return est
    conv, dense, _ = _layers(model_spec, tuple(input_shape), n_outputs)
    value: int | list[int]
    if est.activations > est.weights + est.training_state:
        key, value = "train.batch_size", train_spec.batch_size
    else:
        key = "model.channels" if conv > dense else "model.hidden"
        value = list(model_spec.channels if conv > dense else model_spec.hidden)
    name = (names or {}).get(key, f"{key}={value}")
    raise OutOfMemory(
        f"{name} needs about {gib(est.total)} to train (weights {gib(est.weights)}, gradients "
        f"and {train_spec.optimizer} state {gib(est.training_state)}, "
        f"activations of batch_size {train_spec.batch_size} {gib(est.activations)}); "
        f"{where} has {gib(available)}: lower it")


def machine_memory() -> int:
    """Physical memory of this machine, bytes (0 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0
