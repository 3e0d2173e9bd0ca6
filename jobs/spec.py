"""The job spec: ``JobSpec`` composes the typed sections of the layers below and adds the
schedule; this module reads YAML into it and turns validation errors into one line.

The sections live with their users: data, impute, model and train in trainer/config.py; tune,
resources, tracking and ``SweepSpec`` (all of the spec but the schedule) in tuning/config.py.
Their names are re-exported here. Unknown keys, wrong types and out-of-range values are errors
that name the key path, the value received and what is allowed. YAML is read with a safe
loader that refuses aliases (no YAML bombs) and any tag that would construct Python objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from trainer.config import (
    MAX_LAYER_SIZE,
    MAX_LAYERS,
    Activation,
    CategoricalStrategy,
    DataSpec,
    EarlyStoppingSpec,
    EntryError,
    ImputeSpec,
    ModelSpec,
    NumericStrategy,
    SpecError,
    SplitSpec,
    StrictSection,
    TrainSpec,
)
from tuning.config import (
    DIMENSION_KINDS,
    METRIC_MODES,
    SEARCHES,
    ResourcesSpec,
    SweepSpec,
    TrackingSpec,
    TuneSpec,
    flatten,
    set_path,
)
from tuning.drift import DriftSpec

__all__ = [
    "DIMENSION_KINDS", "MAX_LAYERS", "MAX_LAYER_SIZE", "MAX_SPEC_BYTES", "MAX_SPEC_DEPTH",
    "METRIC_MODES", "SEARCHES", "Activation", "CategoricalStrategy", "DataSpec",
    "EarlyStoppingSpec", "ImputeSpec", "JobSpec", "ModelSpec", "NumericStrategy",
    "ResourcesSpec", "ScheduleSpec", "SpecError", "SplitSpec", "SweepSpec", "TrackingSpec",
    "TrainSpec", "TuneSpec", "flatten", "load_spec", "parse_overrides", "resolve_data_path",
    "set_path", "set_path_raw", "validate_spec",
]

_Model = TypeVar("_Model", bound=BaseModel)
MAX_SPEC_BYTES = 1_000_000
MAX_SPEC_DEPTH = 32


class ScheduleSpec(StrictSection):
    cron: str | None = None
    retrain: Literal["sweep", "refit"] = "sweep"
    promote_if_better_by: float = Field(default=0.0, ge=0)
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


class JobSpec(SweepSpec):
    """The whole spec: what a sweep needs (``SweepSpec``) and the retraining schedule."""

    schedule: ScheduleSpec = Field(default_factory=lambda: ScheduleSpec())

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> Self:
        return _validated(cls, raw)


# --- loading --------------------------------------------------------------------------


class _NoAliasLoader(yaml.SafeLoader):
    """Safe loader that refuses anchors/aliases (a spec never needs them, bombs do),
    duplicate keys (the second would silently win) and deep nesting (a recursion bomb)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
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
    if isinstance(cause, EntryError):  # "train.lr: ..." about an entry of the mapping at loc
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
    spec = _validated(JobSpec, copy.deepcopy(raw))
    if base_dir is not None:
        spec.data.path = resolve_data_path(spec.data.path, base_dir)
    return spec


def _validated(model: type[_Model], raw: dict[str, Any]) -> _Model:
    """``model`` validated from ``raw``; the first error becomes a one-line SpecError."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = _format_error(dict(errors[0]), raw)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpecError(first + more) from None


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
