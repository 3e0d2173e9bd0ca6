"""`rungwise predict`: predictions of a registered model for a CSV / Parquet file of new rows.

New rows rarely look like the training file: they have no target, and may or may not have a
header row. A CSV's first line is a header when every field in it is a column name the spec or
the model knows; otherwise the columns are named from ``data.columns`` (all of them, or all
but the target) or, for a spec without ``data.columns``, from the model's feature columns.
The output is the input's columns plus ``prediction`` (and ``probability_<class>`` with
``--proba``). A value that is not a number in a numeric column is an error naming its row and
column; absent optional columns are missing values (``trainer.inputs``).
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from jobs.spec import JobSpec
from trainer.errors import UserError


def read_rows(spec: JobSpec, path: str, features: list[str]) -> tuple[pd.DataFrame, int]:
    """The rows of ``path`` read like the training data (delimiter, na_values), and how many
    lines precede the first row (1 with a header row, else 0; 0 for Parquet)."""
    from trainer.data import detect_format, read_table

    if "://" not in path and not Path(path).is_file():  # a URI is read through pyarrow
        raise UserError(f"--input: file not found: {path}")
    fmt = detect_format(path)
    if fmt == "npz":
        raise UserError(f"--input: {path} is images (.npz); rungwise predict reads tables "
                        "(CSV or Parquet)")
    data = spec.data.model_copy(update={"path": path, "format": fmt, "features": features,
                                        "columns": None})
    if fmt == "parquet":
        return read_table(data), 0
    first = _first_fields(path, spec.data.delimiter)
    known = set(spec.data.columns or []) | set(features) | {spec.data.target}
    if first and all(f.strip() in known for f in first):
        return read_table(data), 1
    names = _names_without_header(spec, path, len(first), features)
    return read_table(data.model_copy(update={"columns": names})), 0


def _first_fields(path: str, delimiter: str) -> list[str]:
    import pyarrow as pa

    head = b""
    with pa.input_stream(path, compression="detect") as raw:
        while b"\n" not in head and len(head) < 2**24 and (chunk := raw.read(2**16)):
            head += chunk
    line = head.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    return next(csv.reader([line], delimiter=delimiter), [])


def _names_without_header(spec: JobSpec, path: str, n: int, features: list[str]) -> list[str]:
    columns, target = list(spec.data.columns or []), spec.data.target
    if columns and n == len(columns):
        return columns
    if columns and target in columns and n == len(columns) - 1:
        return [c for c in columns if c != target]
    if not columns and n == len(features):
        return features
    if columns:
        expected = f"{len(columns)} (data.columns) or {len(columns) - 1} (without {target!r})"
    else:
        expected = f"{len(features)} (the model's features, in training order)"
    raise UserError(f"--input: {path} has {n} columns and no header row; expected {expected}, "
                    "or a header row that names the columns")


def predict_command(spec: JobSpec, input_path: str, output: str | None, alias: str,
                    proba: bool = False) -> int:
    from tuning import registry
    from tuning.tracking import resolve_tracking_uri

    name = spec.tracking.register_as
    if not name:
        raise UserError("tracking.register_as: not set in the spec, so there is no registered "
                        "model to predict with")
    uri = resolve_tracking_uri(spec.tracking.uri)
    bundle = registry.load_bundle(uri, name, alias)
    if proba and bundle.task != "classification":
        raise UserError("--proba: the model is a regression; probabilities are for "
                        "classification")
    rows, skip = read_rows(spec, input_path, [str(c) for c in bundle.feature_columns])
    out = predictions(bundle, rows, spec.data.target, proba, input_path, skip)
    if output:
        _write(out, output)
        print(f"wrote {len(out)} predictions of {name}@{alias} to {output}", file=sys.stderr)
    else:
        out.to_csv(sys.stdout, index=False)
    return 0


def predictions(bundle: Any, rows: pd.DataFrame, target: str, proba: bool, path: str,
                skip: int) -> pd.DataFrame:
    """``rows`` (all its columns) + ``prediction`` [+ ``probability_<class>``]."""
    from trainer.inputs import InputError, conform

    added = ["prediction"] + ([f"probability_{c}" for c in bundle.classes()] if proba else [])
    clash = [c for c in added if c in rows.columns]
    if clash:
        raise UserError(f"--input: {path} already has a column {clash[0]!r}; rename it")
    try:
        features = conform(bundle, rows.drop(columns=[target], errors="ignore"))
    except InputError as exc:
        if exc.position is None:
            raise UserError(f"--input: {path}: {exc}".replace(": input: ", ": ")) from None
        where = f"row {exc.position + 1}" + (
            f" (line {exc.position + 1 + skip})" if not path.endswith((".parquet", ".pq"))
            else "")
        raise UserError(f"--input: {path}: {where}, column {exc.column!r}: {exc.value!r} is "
                        "not a number") from None
    out = rows.copy()
    out["prediction"] = bundle.predict(features)
    if proba:
        probs = bundle.predict_proba(features)  # (N, classes)
        for i, cls in enumerate(bundle.classes()):
            out[f"probability_{cls}"] = probs[:, i]
    return out


def _write(out: pd.DataFrame, output: str) -> None:
    """Written beside the destination, then renamed: never a half-written file."""
    dest = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent if str(
        dest.parent) else ".")
    os.close(fd)
    try:
        if output.endswith((".parquet", ".pq")):
            out.to_parquet(tmp, index=False)
        else:
            out.to_csv(tmp, index=False)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
