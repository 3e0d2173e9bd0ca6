"""What a tabular model takes as input: each column's type and whether a row must have it.

The rule, in one place, for the pyfunc signature (MLflow enforces it), the pyfunc itself and
``rungwise predict``:

* a column is **optional** exactly when the model can do without it: the imputer fills it, or
  dropped it at fit time (too many missing values). Columns imputed by ``drop_rows`` are
  **required**: a prediction row cannot be dropped, so each row needs a value there.
* an absent optional column is the same as a column of missing values;
* the type is the training column's: ``string`` for a categorical, ``boolean`` for a bool,
  ``long`` for an integer column that is required, ``double`` for every other number (an
  integer column that may be missing arrives as floats, as in pandas);
* a value in a numeric column that cannot be read as a number is an error naming its row and
  column, never a missing value that the imputer would silently fill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from trainer.errors import RungwiseError


@dataclass(frozen=True)
class InputColumn:
    name: str
    type: str
    """double | long | boolean | string (MLflow's names for them)"""
    required: bool


class InputError(RungwiseError):
    """A prediction input the model cannot take; names the column (and the row if one)."""

    def __init__(self, message: str, column: str, position: int | None = None,
                 value: Any = None) -> None:
        super().__init__(message)
        self.column, self.position, self.value = column, position, value


def is_tabular(bundle: Any) -> bool:
    return not hasattr(bundle.preprocessor, "transform_x")


def input_columns(bundle: Any, example: pd.DataFrame | None = None) -> list[InputColumn]:
    """The model's input columns in training order; ``example`` (raw training-kind rows)
    gives the integer / bool dtypes the fitted imputer no longer records."""
    imp = bundle.preprocessor.imputer
    required = set(imp.drop_rows_columns_)
    out = []
    for col in bundle.feature_columns:
        kind = imp.column_kinds_.get(col, "numeric")
        dtype = example[col].dtype if example is not None and col in example else None
        out.append(InputColumn(str(col), _type_of(kind, dtype, col in required),
                               col in required))
    return out


def _type_of(kind: str, dtype: Any, required: bool) -> str:
    if kind == "categorical":
        return "string"
    if dtype is not None and pd.api.types.is_bool_dtype(dtype):
        return "boolean"
    if dtype is not None and pd.api.types.is_integer_dtype(dtype) and required:
        return "long"
    return "double"


def as_declared(rows: pd.DataFrame, columns: list[InputColumn]) -> pd.DataFrame:
    """``rows`` with its ``double`` columns as float64: MLflow refuses int64 for a double
    column in a DataFrame (a JSON request's integers it casts itself)."""
    out = rows.copy()
    for c in columns:
        if c.type == "double" and c.name in out and pd.api.types.is_numeric_dtype(out[c.name]):
            out[c.name] = out[c.name].astype("float64")
    return out


def conform(bundle: Any, rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with every input column present (absent optional ones as missing values) and
    numeric columns as numbers; raises ``InputError`` for an absent required column or a
    value that is not a number."""
    imp = bundle.preprocessor.imputer
    required = set(imp.drop_rows_columns_)
    absent = [c for c in bundle.feature_columns if c not in rows.columns]
    needed = [str(c) for c in absent if c in required]
    if needed:
        raise InputError(f"input: missing column(s) {', '.join(needed)}: the model imputes "
                         "them by drop_rows, so every row needs a value there", needed[0])
    out = rows.copy()
    for col in absent:
        out[col] = np.nan if imp.column_kinds_.get(col) != "categorical" else pd.Series(
            [None] * len(out), index=out.index, dtype="str")
    for col in bundle.feature_columns:
        if imp.column_kinds_.get(col, "numeric") == "numeric":
            out[col] = _numbers(out[col], str(col))
    return out


def _numbers(s: pd.Series, column: str) -> pd.Series:
    if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        return s
    values = []
    for pos, v in enumerate(s.tolist()):
        values.append(_number(v, column, pos))
    return pd.Series(values, index=s.index, dtype="float64", name=s.name)


def _number(v: Any, column: str, pos: int) -> float:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return math.nan
    if isinstance(v, bool | int | float | np.number):
        return float(v)
    text = str(v).strip()
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise InputError(f"input: row {pos}, column {column!r}: {text[:40]!r} is not a number",
                         column, pos, text) from None
