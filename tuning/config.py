"""The spec's sections that tuning/ uses (tune, resources, tracking) and ``SweepSpec``, what a
sweep needs: the trainer's sections (trainer/config.py) with these three.

jobs/spec.py's ``JobSpec`` adds the schedule and reads YAML; every layer below types its
argument as ``SweepSpec`` or one of its sections. ``SweepSpec.with_overrides`` is how a trial
(or a check of the search space) gets its own validated copy of the spec.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Self, get_args

from pydantic import Field, field_validator, model_validator

from trainer.config import (
    DataSpec,
    EntryError,
    ImputeSpec,
    ModelSpec,
    SpecError,
    StrictSection,
    TrainSpec,
)

__all__ = ["DIMENSION_KINDS", "METRICS", "METRIC_MODES", "SEARCHES", "Metric", "ResourcesSpec",
           "Search", "SweepSpec", "TrackingSpec", "TuneSpec", "flatten", "set_path"]

Search = Literal["grid", "random", "bayes", "asha", "hyperband", "bohb", "median", "pbt", "auto"]
Metric = Literal["val_loss", "val_accuracy", "val_rmse", "train_loss"]
Mode = Literal["min", "max"]
Placement = Literal["pack", "spread", "strict_pack", "strict_spread"]

SEARCHES: tuple[Search, ...] = get_args(Search)
METRICS: tuple[Metric, ...] = get_args(Metric)
METRIC_MODES: dict[str, Mode] = {"val_loss": "min", "val_accuracy": "max", "val_rmse": "min",
                                "train_loss": "min"}
"""The direction of each of ``METRICS``: a ``tune.mode`` left out is the metric's."""
DIMENSION_KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")


class TuneSpec(StrictSection):
    search: Search = "asha"
    num_samples: int = Field(default=8, ge=1, le=100_000)
    max_concurrent: int = Field(default=2, ge=1, le=10_000)
    metric: Metric = "val_loss"
    mode: Mode = "min"
    """Default: the metric's (``METRIC_MODES``)."""
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=3, ge=2)
    max_failures: int = Field(default=0, ge=0)
    time_budget_s: float | None = Field(default=None, gt=0)
    storage: str | None = Field(default=None, min_length=1)
    """Where trials' checkpoints, Tune's state and rungwise's own state go: a path every node
    sees (NFS) or a URI (s3://, gs://, ...); default RUNGWISE_STORAGE, else ./rungwise-runs."""
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Dotted spec paths -> one dimension each (``{"loguniform": [1e-4, 1e-1]}``)."""
    pack: Literal["off", "auto"] | int = "off"
    """Train up to N trials of one architecture together in one worker (tuning/packed_trial.py);
    ``auto``: 8 where ``trainer.pack_member.pack_pays`` says it pays, else off."""

    @field_validator("pack", mode="before")
    @classmethod
    def _pack(cls, v: Any) -> Any:
        if v is False or v == "off":  # YAML 1.1 reads a bare `off` as false
            return "off"
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 2):
            return v
        raise ValueError(f"must be off, auto or a whole number >= 2 (trials per pack), got {v!r}")

    @field_validator("space")
    @classmethod
    def _dimensions(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for path, dim in space.items():
            _check_dimension(path, dim)
        return space

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        query = (v or "").partition("?")[2].lower()
        if "secret_key" in query or "session_token" in query:
            raise ValueError("credentials do not belong in the URI (it is logged to MLflow); "
                             "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY on every node")
        return v

    @model_validator(mode="before")
    @classmethod
    def _mode(cls, data: Any) -> Any:
        """A missing or null ``mode`` is the metric's (an unknown metric is refused anyway)."""
        if isinstance(data, dict) and data.get("mode") is None:
            metric = data.get("metric", "val_loss")
            data = {**data, "mode": METRIC_MODES.get(metric, "min") if isinstance(metric, str)
                    else "min"}
        return data


def _check_dimension(path: str, dim: Any) -> None:
    where = f"{path}"
    if not isinstance(dim, dict) or len(dim) != 1:
        raise EntryError(f"{where}: a dimension is one of {{{', '.join(DIMENSION_KINDS)}}}: "
                         f"[...], got {dim!r}")
    kind, args = next(iter(dim.items()))
    if kind not in DIMENSION_KINDS:
        raise EntryError(f"{where}: unknown dimension kind {kind!r}, allowed: "
                         f"{', '.join(DIMENSION_KINDS)}")
    if not isinstance(args, list) or not args:
        raise EntryError(f"{where}: {kind} takes a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return
    want = 3 if kind == "quniform" else 2
    nums = [a for a in args if isinstance(a, int | float) and not isinstance(a, bool)]
    if len(args) != want or len(nums) != want or not all(math.isfinite(a) for a in nums):
        raise EntryError(f"{where}: {kind} takes {want} numbers, got {args!r}")
    low, high = args[0], args[1]
    if low >= high:
        raise EntryError(f"{where}: {kind} bounds must be increasing, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise EntryError(f"{where}: loguniform bounds must be positive, got {args!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise EntryError(f"{where}: randint bounds must be integers, got {args!r}")
    if kind == "quniform" and args[2] <= 0:
        raise EntryError(f"{where}: quniform step must be positive, got {args!r}")


class ResourcesSpec(StrictSection):
    workers_per_trial: int = Field(default=1, ge=1, le=1024)
    gpus_per_worker: Literal["auto"] | float = "auto"
    cpus_per_worker: float = Field(default=1.0, gt=0, le=1024)
    placement: Placement = "pack"
    """Where a multi-worker trial's workers go (Ray's placement-group strategies): pack them
    on few nodes (fast collectives), or spread them over nodes (more memory, survives less
    contention)."""

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus(cls, v: str | float) -> str | float:
        if not isinstance(v, str) and (v < 0 or (v > 1 and v != int(v))):
            raise ValueError(f"must be 'auto', a fraction in [0, 1] or a whole number, got {v}")
        return v


class TrackingSpec(StrictSection):
    uri: str | None = None
    register_as: str | None = None
    experiment: str | None = None
    """MLflow experiment; default: the spec's name."""


class SweepSpec(StrictSection):
    """The spec without its schedule: everything a training run or a sweep reads."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")
    data: DataSpec
    impute: ImputeSpec = Field(default_factory=lambda: ImputeSpec())
    model: ModelSpec = Field(default_factory=lambda: ModelSpec())
    train: TrainSpec = Field(default_factory=lambda: TrainSpec())
    tune: TuneSpec = Field(default_factory=lambda: TuneSpec())
    resources: ResourcesSpec = Field(default_factory=lambda: ResourcesSpec())
    tracking: TrackingSpec = Field(default_factory=lambda: TrackingSpec())

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.tune.metric == "val_accuracy" and self.data.task == "regression":
            raise ValueError("tune.metric: val_accuracy needs data.task: classification; "
                             "use val_loss or val_rmse")
        if self.tune.metric == "val_rmse" and self.data.task == "classification":
            raise ValueError("tune.metric: val_rmse needs data.task: regression; "
                             "use val_loss or val_accuracy")
        _check_pack(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_overrides(self, overrides: dict[str, Any]) -> Self:
        """A new validated spec with dotted-path overrides (``{"train.lr": 0.01}``)."""
        raw = self.to_dict()
        for path, value in overrides.items():
            set_path(raw, path, value)
        return self.from_raw(raw)

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> Self:
        """Validate a plain dict. ``JobSpec`` (jobs/spec.py), the spec every command loads,
        turns the errors into one ``SpecError`` line naming the key path."""
        return cls.model_validate(raw)

    def flat(self) -> dict[str, Any]:
        """The spec as ``{"train.lr": 0.001, ...}`` (lists kept as values), for params."""
        return flatten(self.to_dict())


PAUSING: tuple[Search, ...] = ("hyperband", "bohb", "pbt")
"""Schedulers that pause and resume trials: a packed member cannot be paused."""


def _check_pack(spec: SweepSpec) -> None:
    """``tune.pack: N`` only where a pack can train the trials (``auto`` falls back instead)."""
    n = spec.tune.pack
    if not isinstance(n, int):
        return
    dim = spec.tune.space.get("model.kind")
    kinds = {spec.model.kind, *(next(iter(dim.values())) if dim else [])}
    if "cnn" in kinds:
        raise ValueError(f"tune.pack: {n} packs MLPs only, and model.kind can be cnn; "
                         "set tune.pack: off")
    if spec.resources.workers_per_trial > 1:
        raise ValueError(f"tune.pack: {n} trains a pack in one worker, but "
                         f"resources.workers_per_trial is {spec.resources.workers_per_trial}; "
                         "set it to 1 or tune.pack: off")
    if spec.tune.search in PAUSING:
        raise ValueError(f"tune.pack: {n} cannot be used with tune.search: "
                         f"{spec.tune.search}, which pauses trials; use asha, median, random, "
                         "bayes or grid, or tune.pack: off")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "space":
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict; every part but the last must already be a section."""
    parts = path.split(".")
    node: Any = raw
    unset = False  # an optional section that is null: its keys are checked by validation
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            if isinstance(node, dict) and part in node and node[part] is None:
                node[part], unset = {}, True
            else:
                raise SpecError(f"{'.'.join(parts[:i + 1])}: no such section in the spec "
                                f"(setting {path})")
        node = node[part]
    if parts[-1] not in node and not unset:
        allowed = ", ".join(sorted(node)) if isinstance(node, dict) else "none"
        raise SpecError(f"{path}: no such key in the spec; allowed here: {allowed}")
    node[parts[-1]] = value
