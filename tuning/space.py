"""`tune.space` (dotted paths into the spec) -> a Ray Tune param space, checked up front.

Values that are not scalars (``model.hidden: [128, 64]``) travel as JSON strings, so every
searcher (Optuna included) sees plain categorical choices and MLflow shows readable params.
A trial's config comes back through ``TrialConfig.of`` (``tuning.trainable.trial_spec``): the
decoded choices, the validated spec they make and the imputation variant (which prepared data
the trial trains on). ``decode_config`` is the one reader of the ``json:`` strings.
Every path and every value a trial could receive is validated against the spec before any
trial starts: a typo fails in a second, not after an hour of sweeping.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuning.config import SweepSpec
from tuning.errors import RungwiseError

JSON_PREFIX = "json:"


def _encode(value: Any) -> Any:
    if isinstance(value, list | dict):
        return JSON_PREFIX + json.dumps(value)
    return value


def decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(JSON_PREFIX):
        return json.loads(value[len(JSON_PREFIX):])
    return value


def decode_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Trial config -> ``{"train.lr": 0.01, "model.hidden": [64]}`` (only space keys)."""
    return {k: decode(v) for k, v in config.items() if "." in k}


@dataclass(frozen=True)
class TrialConfig:
    """One trial's choices, read from its Ray Tune config, and the spec they make."""

    overrides: dict[str, Any]
    """The searched keys, decoded: ``{"train.lr": 0.01, "model.hidden": [64]}``."""
    spec: SweepSpec
    """The sweep's spec with ``overrides`` applied, validated."""

    @classmethod
    def of(cls, spec: SweepSpec, config: Mapping[str, Any]) -> TrialConfig:
        overrides = decode_config(config)
        return cls(overrides, spec.with_overrides(overrides) if overrides else spec)

    @property
    def variant(self) -> str:
        """The imputation choices: the key of the prepared data this trial trains on."""
        return variant_key(self.overrides)


def build_param_space(space: dict[str, dict[str, Any]], *, grid: bool = False) -> dict[str, Any]:
    """Ray Tune domains for each dimension; with ``grid`` every dimension must be discrete."""
    from ray import tune  # here, so that loading a spec (which validates its space) needs no Ray

    out: dict[str, Any] = {}
    for path, dim in space.items():
        kind, args = next(iter(dim.items()))
        if kind == "grid" or (grid and kind == "choice"):
            out[path] = tune.grid_search([_encode(v) for v in args])
        elif grid:
            raise RungwiseError(f"tune.space.{path}: grid search needs choice or grid values, "
                                f"got {kind}; use tune.search: random or bayes")
        elif kind == "choice":
            out[path] = tune.choice([_encode(v) for v in args])
        elif kind == "uniform":
            out[path] = tune.uniform(args[0], args[1])
        elif kind == "loguniform":
            out[path] = tune.loguniform(args[0], args[1])
        elif kind == "randint":
            out[path] = tune.randint(args[0], args[1])
        elif kind == "quniform":
            out[path] = tune.quniform(args[0], args[1], args[2])
    return out


def candidate_values(dim: dict[str, Any]) -> list[Any]:
    """Values that represent a dimension for validation: every choice, or both bounds."""
    kind, args = next(iter(dim.items()))
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


def validate_space(spec: SweepSpec) -> None:
    """Apply every candidate value of every dimension to the spec; errors name the path."""
    for path, dim in spec.tune.space.items():
        if path.startswith(("tune.", "tracking.", "schedule.", "resources.", "name")):
            raise RungwiseError(f"tune.space.{path}: only data, impute, model and train "
                                "values can be searched")
        for value in candidate_values(dim):
            try:
                spec.with_overrides({path: value})
            except ValueError as exc:  # the spec's SpecError
                raise RungwiseError(f"tune.space.{path}: value {value!r} is refused by the "
                                    f"spec: {exc}") from None


def impute_keys(spec: SweepSpec) -> list[str]:
    return [p for p in spec.tune.space if p.startswith("impute.")]


def impute_variants(spec: SweepSpec) -> list[dict[str, Any]] | None:
    """Every distinct imputation choice the space can produce, or None if not enumerable."""
    keys = impute_keys(spec)
    if not keys:
        return [{}]
    values = []
    for k in keys:
        kind, args = next(iter(spec.tune.space[k].items()))
        if kind not in ("choice", "grid"):
            return None
        values.append(args)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def variant_key(overrides: dict[str, Any]) -> str:
    return json.dumps({k: overrides[k] for k in sorted(overrides) if k.startswith("impute.")},
                      sort_keys=True)


def grid_size(space: dict[str, dict[str, Any]]) -> int:
    n = 1
    for dim in space.values():
        kind, args = next(iter(dim.items()))
        if kind in ("choice", "grid"):
            n *= len(args)
    return n
