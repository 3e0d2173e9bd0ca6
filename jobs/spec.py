"""The job spec: one pydantic model, the single source of truth for every component.

Each component takes its own section (``spec.data``, ``spec.train`` ...). Unknown keys,
wrong types and out-of-range values are errors that name the key path, the value received
and what is allowed. YAML is read with a safe loader that refuses aliases (no YAML bombs)
and any tag that would construct Python objects.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.errors import RungwiseError
from tuning.drift import DriftSpec

MAX_SPEC_BYTES = 1_000_000
MAX_SPEC_DEPTH = 32
# Upper bounds on sizes that no machine runs (what fits a given cluster is checked before a
# run starts, from the data's shape: trainer/memory.py).
MAX_LAYERS = 64
MAX_LAYER_SIZE = 2**20


class SpecError(RungwiseError):
    """A job spec that cannot be used; the message is one line naming the key path."""


class _EntryError(ValueError):
    """A validator's error about one entry of a mapping; the message starts with its key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitSpec(_Strict):
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    seed: int = 0
    stratify: bool = True

    @model_validator(mode="after")
    def _fractions(self) -> SplitSpec:
        if self.val + self.test >= 0.9:
            raise ValueError(f"val + test must be below 0.9, got {self.val + self.test:g}")
        return self


class DataSpec(_Strict):
    path: str
    """CSV, Parquet or .npz (images); relative paths are resolved against the spec's folder."""
    target: str = "y"
    task: Literal["classification", "regression"] = "classification"
    format: Literal["auto", "csv", "parquet", "npz"] = "auto"
    features: list[str] | None = None
    categorical: list[str] | None = None
    columns: list[str] | None = None
    """Column names for a CSV without a header row."""
    delimiter: str = ","
    na_values: list[str] = Field(default_factory=list)
    split: SplitSpec = Field(default_factory=SplitSpec)

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, v: str) -> str:
        if len(v) != 1:
            raise ValueError(f"must be one character, got {v!r}")
        return v


NumericStrategy = Literal["mean", "median", "mode", "constant", "model", "drop_rows"]
CategoricalStrategy = Literal["mode", "constant", "category", "drop_rows"]


class ImputeSpec(_Strict):
    numeric: NumericStrategy = "median"
    categorical: CategoricalStrategy = "category"
    drop_columns_above: float | None = Field(None, gt=0, le=1)
    indicator: bool = False
    fill_value: float | str | None = None


Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "softplus", "sign"]


class ModelSpec(_Strict):
    kind: Literal["mlp", "cnn"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    activation: Activation = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    """CNN only: output channels of each conv block (conv -> activation -> pool)."""
    kernel_size: int = Field(3, ge=1, le=15)
    pool: Literal["max", "avg", "none"] = "max"

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


class EarlyStoppingSpec(_Strict):
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0)


class TrainSpec(_Strict):
    epochs: int = Field(30, ge=1, le=100_000)
    batch_size: int = Field(256, ge=1, le=2**24)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["none", "cosine", "step"] = "none"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    early_stopping: EarlyStoppingSpec | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(1, ge=1, le=1024)
    """torch intra-op threads per trial; 1 is fastest when trials share the cores."""
    deterministic: bool = False
    """Deterministic kernels (cuDNN, cuBLAS, torch's deterministic algorithms): reproducible
    GPU runs, at some speed."""


SEARCHES = ("grid", "random", "bayes", "asha", "hyperband", "bohb", "median", "pbt", "auto")
DIMENSION_KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
METRIC_MODES = {"val_loss": "min", "val_accuracy": "max", "val_rmse": "min", "train_loss": "min"}


class TuneSpec(_Strict):
    search: Literal["grid", "random", "bayes", "asha", "hyperband", "bohb", "median", "pbt",
                    "auto"] = "asha"
    num_samples: int = Field(8, ge=1, le=100_000)
    max_concurrent: int = Field(2, ge=1, le=10_000)
    metric: Literal["val_loss", "val_accuracy", "val_rmse", "train_loss"] = "val_loss"
    mode: Literal["min", "max"] | None = None
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)
    max_failures: int = Field(0, ge=0)
    time_budget_s: float | None = Field(None, gt=0)
    storage: str | None = Field(None, min_length=1)
    """Where trials' checkpoints, Tune's state and rungwise's own state go: a path every node
    sees (NFS) or a URI (s3://, gs://, ...); default RUNGWISE_STORAGE, else ./rungwise-runs."""
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)

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

    @model_validator(mode="after")
    def _mode(self) -> TuneSpec:
        if self.mode is None:
            self.__dict__["mode"] = METRIC_MODES[self.metric]
        return self


def _check_dimension(path: str, dim: Any) -> None:
    where = f"{path}"
    if not isinstance(dim, dict) or len(dim) != 1:
        raise _EntryError(f"{where}: a dimension is one of {{{', '.join(DIMENSION_KINDS)}}}: "
                         f"[...], got {dim!r}")
    kind, args = next(iter(dim.items()))
    if kind not in DIMENSION_KINDS:
        raise _EntryError(f"{where}: unknown dimension kind {kind!r}, allowed: "
                         f"{', '.join(DIMENSION_KINDS)}")
    if not isinstance(args, list) or not args:
        raise _EntryError(f"{where}: {kind} takes a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return
    want = 3 if kind == "quniform" else 2
    nums = [a for a in args if isinstance(a, int | float) and not isinstance(a, bool)]
    if len(args) != want or len(nums) != want or not all(math.isfinite(a) for a in nums):
        raise _EntryError(f"{where}: {kind} takes {want} numbers, got {args!r}")
    low, high = args[0], args[1]
    if low >= high:
        raise _EntryError(f"{where}: {kind} bounds must be increasing, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise _EntryError(f"{where}: loguniform bounds must be positive, got {args!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise _EntryError(f"{where}: randint bounds must be integers, got {args!r}")
    if kind == "quniform" and args[2] <= 0:
        raise _EntryError(f"{where}: quniform step must be positive, got {args!r}")


class ResourcesSpec(_Strict):
    workers_per_trial: int = Field(1, ge=1, le=1024)
    gpus_per_worker: Literal["auto"] | float = "auto"
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"
    """Where a multi-worker trial's workers go (Ray's placement-group strategies): pack them
    on few nodes (fast collectives), or spread them over nodes (more memory, survives less
    contention)."""

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus(cls, v: str | float) -> str | float:
        if not isinstance(v, str) and (v < 0 or (v > 1 and v != int(v))):
            raise ValueError(f"must be 'auto', a fraction in [0, 1] or a whole number, got {v}")
        return v


class TrackingSpec(_Strict):
    uri: str | None = None
    register_as: str | None = None
    experiment: str | None = None
    """MLflow experiment; default: the spec's name."""


class ScheduleSpec(_Strict):
    cron: str | None = None
    retrain: Literal["sweep", "refit"] = "sweep"
    promote_if_better_by: float = Field(0.0, ge=0)
    trigger: Literal["always", "drift"] = "always"
    drift: DriftSpec = Field(default_factory=DriftSpec)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            from croniter import croniter

            if len(v.split()) != 5 or not croniter.is_valid(v):
                raise ValueError(f"not a valid cron expression: {v!r} "
                                 "(five fields: minute hour day-of-month month day-of-week)")
        return v


class JobSpec(_Strict):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")
    data: DataSpec
    impute: ImputeSpec = Field(default_factory=ImputeSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    tune: TuneSpec = Field(default_factory=TuneSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.tune.metric == "val_accuracy" and self.data.task == "regression":
            raise ValueError("tune.metric: val_accuracy needs data.task: classification; "
                             "use val_loss or val_rmse")
        if self.tune.metric == "val_rmse" and self.data.task == "classification":
            raise ValueError("tune.metric: val_rmse needs data.task: regression; "
                             "use val_loss or val_accuracy")
        return self

    # --- helpers used by tuning/ and jobs/ without importing this module ---------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_overrides(self, overrides: dict[str, Any]) -> JobSpec:
        """A new validated spec with dotted-path overrides (``{"train.lr": 0.01}``)."""
        raw = self.to_dict()
        for path, value in overrides.items():
            set_path(raw, path, value)
        return validate_spec(raw, base_dir=None)

    def flat(self) -> dict[str, Any]:
        """The spec as ``{"train.lr": 0.001, ...}`` (lists kept as values), for params."""
        return flatten(self.to_dict())


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


# --- loading --------------------------------------------------------------------------


class _NoAliasLoader(yaml.SafeLoader):
    """Safe loader that refuses anchors/aliases (a spec never needs them, bombs do),
    duplicate keys (the second would silently win) and deep nesting (a recursion bomb)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise SpecError(f"YAML aliases (*{event.anchor}) are not allowed in a job spec "
                            f"(line {event.start_mark.line + 1})")
        if self._depth >= MAX_SPEC_DEPTH:
            mark = self.peek_event().start_mark
            raise SpecError(f"YAML nested more than {MAX_SPEC_DEPTH} levels deep "
                            f"(line {mark.line + 1}); a job spec needs a handful")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _format_error(err: dict[str, Any], raw: Any) -> str:
    loc = _key_path(err["loc"], raw)
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        return f"{loc}: unknown key; allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _EntryError):  # "train.lr: ..." about an entry of the mapping at loc
        return f"{loc}.{cause}" if loc else str(cause)
    if not loc:
        return msg
    if err["type"] == "value_error":  # rungwise's own validators say what they got
        return f"{loc}: {msg}"
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{loc}: {msg}; got {shown}"


def _key_path(loc: tuple[Any, ...], raw: Any) -> str:
    """The parts of a pydantic location that are keys of the spec, joined with dots.

    pydantic also puts union members (``float``, ``literal['auto']``) and validator names
    into a location; they follow a scalar of the input, where no key can follow.
    """
    parts: list[str] = []
    node = raw
    for part in loc:
        if str(part).startswith("function-"):
            continue
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            node = node[part] if 0 <= part < len(node) else None
        else:
            continue
        parts.append(str(part))
    return ".".join(parts)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                 and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return sorted(model.model_fields)


def validate_spec(raw: Any, base_dir: Path | None) -> JobSpec:
    """Validate a parsed spec; the first error becomes a one-line SpecError."""
    if not isinstance(raw, dict):
        raise SpecError(f"a job spec is a mapping of sections, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = _format_error(errors[0], raw)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpecError(first + more) from None
    if base_dir is not None:
        spec.data.path = resolve_data_path(spec.data.path, base_dir)
    return spec


def resolve_data_path(path: str, base_dir: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base_dir / path).resolve())


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read, override (dotted keys) and validate a YAML job spec."""
    p = Path(path)
    text = _read_spec_bytes(p)
    try:
        raw = yaml.load(text.decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 (safe)
    except UnicodeDecodeError:
        raise SpecError(f"{p}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{p}: not valid YAML{where}: {problem}") from None
    if isinstance(raw, dict):
        for key, value in (overrides or {}).items():
            set_path_raw(raw, key, value)
    spec = validate_spec(raw, base_dir=p.resolve().parent)
    _check_space(spec)
    return spec


def _check_space(spec: JobSpec) -> None:
    """Every path and value of ``tune.space`` checked on load, in every command, so that
    ``rungwise inspect`` and ``train`` refuse what ``tune`` would refuse."""
    from tuning.errors import RungwiseError
    from tuning.space import validate_space

    try:
        validate_space(spec)
    except RungwiseError as exc:
        raise SpecError(str(exc)) from None


def _read_spec_bytes(p: Path) -> bytes:
    """The file's bytes, its size checked before reading; only a regular file (a FIFO or a
    device such as /dev/zero would block or never end)."""
    import stat

    try:
        st = p.stat()
    except OSError:
        raise SpecError(f"spec file not found: {p}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecError(f"spec file not found: {p} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{p}: not a regular file; a job spec is a YAML file")
    if st.st_size > MAX_SPEC_BYTES:
        raise SpecError(f"spec file is {st.st_size:,} bytes; the limit is {MAX_SPEC_BYTES:,}")
    with p.open("rb") as f:
        text = f.read(MAX_SPEC_BYTES + 1)  # a file that grew since stat is still bounded
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"spec file is over {MAX_SPEC_BYTES:,} bytes; the limit is "
                        f"{MAX_SPEC_BYTES:,}")
    return text


def set_path_raw(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted key in the raw YAML dict, creating sections; validation follows."""
    node = raw
    parts = path.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise SpecError(f"{path}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "model.hidden=[64]"]`` -> dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set takes key.path=value, got {item!r}")
        try:
            out[key.strip()] = yaml.load(value, Loader=_NoAliasLoader)  # noqa: S506
        except yaml.YAMLError:
            out[key.strip()] = value
    return out
