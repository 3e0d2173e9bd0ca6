"""Before a sweep starts: every trial its search space can draw must fit the memory of the
cluster's largest node. The extremes are checked: each choice of the model's layers, with the
largest batch size and the optimiser with the most state that the space allows."""

from __future__ import annotations

import itertools
import math
from typing import Any

import ray

from trainer.arrays import Shapes
from trainer.memory import OPTIMIZER_STATE, check_fits
from tuning.config import SweepSpec

LAYER_KEYS = ("model.kind", "model.hidden", "model.channels")


def largest_node_memory() -> int:
    """Bytes of Ray's ``memory`` resource (what tasks may use) on the largest alive node."""
    return int(max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")),
                   default=0))


def _choices(space: dict[str, dict[str, Any]], key: str) -> list[Any] | None:
    dim = space.get(key)
    if not dim:
        return None
    kind, args = next(iter(dim.items()))
    return list(args) if kind in ("choice", "grid") else None


def _largest(space: dict[str, dict[str, Any]], key: str) -> Any:
    dim = space.get(key)
    if not dim:
        return None
    kind, args = next(iter(dim.items()))
    if kind in ("choice", "grid"):
        return max(args, key=lambda v: OPTIMIZER_STATE.get(v, 0) if isinstance(v, str) else v)
    return int(math.ceil(args[1]))  # uniform / randint / quniform: the upper bound


def extremes(spec: SweepSpec) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """(overrides, how to name each key) for every layer choice at the largest batch size."""
    space = spec.tune.space
    fixed = {k: v for k in ("train.batch_size", "train.optimizer")
             if (v := _largest(space, k)) is not None}
    names = {"train.batch_size": f"tune.space.train.batch_size: the largest value "
                                 f"{fixed['train.batch_size']}"} \
        if "train.batch_size" in fixed else {}
    dims = {k: c for k in LAYER_KEYS if (c := _choices(space, k)) is not None}
    out: list[tuple[dict[str, Any], dict[str, str]]] = []
    for combo in itertools.product(*dims.values()):
        chosen = dict(zip(dims, combo, strict=True))
        out.append(({**fixed, **chosen}, {**names, **{
            k: f"tune.space.{k}: the choice {v}" for k, v in chosen.items()}}))
    return out


def check_sweep_fits(spec: SweepSpec, prepared: list[Shapes]) -> None:
    """Raise ``OutOfMemory`` naming the first trial config that cannot fit any node; the data
    is the widest of the ``prepared`` imputation variants."""
    available = largest_node_memory()
    if not available or not prepared:
        return
    widest = max(prepared, key=lambda p: math.prod(p.input_shape))
    input_shape, n_outputs = tuple(widest.input_shape), int(widest.n_outputs)
    for overrides, names in extremes(spec):
        trial = spec.with_overrides(overrides) if overrides else spec
        if trial.model.kind == "cnn" and len(input_shape) == 1:
            continue  # refused elsewhere: a CNN needs images
        check_fits(trial.model, trial.train, input_shape, n_outputs, available,
                   "the largest node of the Ray cluster", names)
