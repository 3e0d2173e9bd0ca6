"""The spec's sections that trainer/ uses, typed once: data (and its split), impute, model, train.

Every layer imports these classes (tuning/config.py adds tune, resources and tracking;
jobs/spec.py adds the schedule and loads YAML), so ``spec.train.lr`` has one type and one
set of limits wherever it is read. Each choice is a ``Literal`` defined here; its tuple of
allowed values (``OPTIMIZERS``, ``NUMERIC_STRATEGIES`` ...) is read from the same ``Literal``
for code that checks values outside pydantic (the ``Imputer``, built directly by a user).

Sections are strict pydantic models: unknown keys, wrong types and out-of-range values are
errors; jobs/spec.py turns them into one line naming the key path.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from trainer.errors import RungwiseError

__all__ = [
    "ACTIVATIONS", "CATEGORICAL_STRATEGIES", "DEVICES", "FORMATS", "KINDS", "LR_SCHEDULES",
    "MAX_LAYERS", "MAX_LAYER_SIZE", "NUMERIC_STRATEGIES", "OPTIMIZERS", "POOLS", "TASKS",
    "Activation", "CategoricalStrategy", "DataSpec", "Device", "EarlyStoppingSpec",
    "EntryError", "ImputeSpec", "ModelSpec", "NumericStrategy", "Optimizer", "SpecError",
    "SplitSpec", "StrictSection", "Task", "TrainSpec",
]

# Upper bounds on sizes that no machine runs (what fits a given cluster is checked before a
# run starts, from the data's shape: trainer/memory.py).
MAX_LAYERS = 64
MAX_LAYER_SIZE = 2**20

Task = Literal["classification", "regression"]
DataFormat = Literal["auto", "csv", "parquet", "npz"]
NumericStrategy = Literal["mean", "median", "mode", "constant", "model", "drop_rows"]
CategoricalStrategy = Literal["mode", "constant", "category", "drop_rows"]
ModelKind = Literal["mlp", "cnn"]
Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "softplus", "sign"]
Pool = Literal["max", "avg", "none"]
Optimizer = Literal["sgd", "adam", "adamw"]
LrSchedule = Literal["none", "cosine", "step"]
Device = Literal["auto", "cpu", "cuda"]

TASKS: tuple[Task, ...] = get_args(Task)
FORMATS: tuple[DataFormat, ...] = get_args(DataFormat)
NUMERIC_STRATEGIES: tuple[NumericStrategy, ...] = get_args(NumericStrategy)
CATEGORICAL_STRATEGIES: tuple[CategoricalStrategy, ...] = get_args(CategoricalStrategy)
KINDS: tuple[ModelKind, ...] = get_args(ModelKind)
ACTIVATIONS: tuple[Activation, ...] = get_args(Activation)
POOLS: tuple[Pool, ...] = get_args(Pool)
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)
LR_SCHEDULES: tuple[LrSchedule, ...] = get_args(LrSchedule)
DEVICES: tuple[Device, ...] = get_args(Device)


class SpecError(RungwiseError):
    """A job spec that cannot be used; the message is one line naming the key path."""


class EntryError(RungwiseError):
    """A validator's error about one entry of a mapping; the message starts with its key
    (jobs/spec.py puts the mapping's key path in front)."""


class StrictSection(BaseModel):
    """A section of the spec: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitSpec(StrictSection):
    val: float = Field(default=0.15, gt=0, lt=1)
    test: float = Field(default=0.15, gt=0, lt=1)
    seed: int = 0
    stratify: bool = True

    @model_validator(mode="after")
    def _fractions(self) -> SplitSpec:
        if self.val + self.test >= 0.9:
            raise ValueError(f"val + test must be below 0.9, got {self.val + self.test:g}")
        return self


class DataSpec(StrictSection):
    path: str
    """CSV, Parquet or .npz (images); relative paths are resolved against the spec's folder."""
    target: str = "y"
    task: Task = "classification"
    format: DataFormat = "auto"
    features: list[str] | None = None
    categorical: list[str] | None = None
    columns: list[str] | None = None
    """Column names for a CSV without a header row."""
    delimiter: str = ","
    na_values: list[str] = Field(default_factory=list)
    split: SplitSpec = Field(default_factory=lambda: SplitSpec())

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, v: str) -> str:
        if len(v) != 1:
            raise ValueError(f"must be one character, got {v!r}")
        return v


class ImputeSpec(StrictSection):
    numeric: NumericStrategy = "median"
    categorical: CategoricalStrategy = "category"
    drop_columns_above: float | None = Field(default=None, gt=0, le=1)
    indicator: bool = False
    fill_value: float | str | None = None
    """For ``constant``: the number put in numeric columns (default 0) and the text put in
    categorical ones (default ``__missing__``)."""

    @field_validator("fill_value")
    @classmethod
    def _number_for_numbers(cls, v: float | str | None, info: ValidationInfo
                            ) -> float | str | None:
        if info.data.get("numeric") == "constant" and isinstance(v, str):
            raise ValueError(f"got {v!r}, allowed: a number when impute.numeric=constant")
        return v


class ModelSpec(StrictSection):
    kind: ModelKind = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    activation: Activation = "relu"
    dropout: float = Field(default=0.0, ge=0, lt=1)
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    """CNN only: output channels of each conv block (conv -> activation -> pool)."""
    kernel_size: int = Field(default=3, ge=1, le=15)
    pool: Pool = "max"

    @field_validator("hidden", "channels")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        bad = [x for x in v if x < 1]
        if bad:
            raise ValueError(f"layer sizes must be >= 1, got {v}")
        if len(v) > MAX_LAYERS or max(v, default=0) > MAX_LAYER_SIZE:
            raise ValueError(f"at most {MAX_LAYERS} layers of at most {MAX_LAYER_SIZE:,} "
                             f"units each, got {_brief(v)}")
        return v


def _brief(v: list[int]) -> str:
    return str(v) if len(v) <= 8 else f"[{', '.join(map(str, v[:8]))}, ...] ({len(v)} layers)"


class EarlyStoppingSpec(StrictSection):
    patience: int = Field(default=5, ge=1)
    min_delta: float = Field(default=0.0, ge=0)


class TrainSpec(StrictSection):
    epochs: int = Field(default=30, ge=1, le=100_000)
    batch_size: int = Field(default=256, ge=1, le=2**24)
    optimizer: Optimizer = "adamw"
    lr: float = Field(default=1e-3, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_schedule: LrSchedule = "none"
    step_size: int = Field(default=10, ge=1)
    gamma: float = Field(default=0.1, gt=0, le=1)
    grad_clip: float | None = Field(default=None, gt=0)
    early_stopping: EarlyStoppingSpec | None = None
    seed: int = 0
    device: Device = "auto"
    threads: int = Field(default=1, ge=1, le=1024)
    """torch intra-op threads per trial; 1 is fastest when trials share the cores."""
    deterministic: bool = False
    """Deterministic kernels (cuDNN, cuBLAS, torch's deterministic algorithms): reproducible
    GPU runs, at some speed."""
