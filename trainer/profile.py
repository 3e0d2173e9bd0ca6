"""A compact profile of the training split, per input column: the reference for drift checks.

Computed where the preprocessing is fitted (``Preprocessor.fit``, on the training split only)
and saved beside it as ``profile.json`` in every model bundle, so a registered model carries
the statistics of the data it was trained on. Bounded size, no raw rows:

- a number column: its missing share, ``QUANTILES + 1`` quantiles of the observed values and,
  at each of them, the exact share of training values at or below it (so a population
  stability index and a Kolmogorov-Smirnov distance can be computed against new data);
- a category column: its missing share and the counts of its ``MAX_CATEGORIES`` most frequent
  categories, the rest pooled in ``other``;
- the target: its missing share and class counts (classification) or quantiles (regression).

Columns the model does not use (dropped by ``impute.drop_columns_above``) are profiled too and
marked ``used: false``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainer.errors import RungwiseError

FORMAT = "rungwise-profile"
VERSION = 1
NAME = "profile.json"
QUANTILES = 200
"""Quantile intervals per number column (fewer for very wide tables, see ``_levels``)."""
MAX_CATEGORIES = 100
NUMBER_BUDGET = 100_000
"""At most about this many stored numbers over all columns: the file stays small."""
MAX_BYTES = 64 * 2**20
"""A larger profile.json is not one rungwise wrote (categories are bounded, numbers too)."""


class ProfileError(RungwiseError):
    """A profile file that rungwise did not write."""


def _levels(n_columns: int) -> int:
    per_column = NUMBER_BUDGET // max(1, 2 * n_columns)
    return int(max(10, min(QUANTILES, per_column // 10 * 10)))


def numeric_profile(values: pd.Series, levels: int = QUANTILES) -> dict[str, Any]:
    """Missing share, quantiles and the exact CDF at each quantile of one number column."""
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    n = len(x)
    x = np.sort(x[np.isfinite(x)])
    out: dict[str, Any] = {"kind": "numeric", "rows": n, "observed": int(len(x)),
                           "missing": float(1 - len(x) / n) if n else 0.0}
    if len(x) == 0:
        return {**out, "quantiles": [], "cdf": [], "mean": None, "std": None}
    q = np.quantile(x, np.linspace(0.0, 1.0, levels + 1))
    cdf = np.searchsorted(x, q, side="right") / len(x)
    return {**out, "quantiles": [float(v) for v in q], "cdf": [float(v) for v in cdf],
            "mean": float(x.mean()), "std": float(x.std())}


def as_text(values: pd.Series) -> pd.Series:
    """The observed values as category text, one way for the profile and every comparison:
    a number column reads ``9`` whether or not a missing value made pandas store it as 9.0."""
    observed = values[values.notna()]
    if pd.api.types.is_float_dtype(observed) and len(observed):
        x = observed.to_numpy(dtype=np.float64)
        if bool(np.isfinite(x).all() and (x == np.round(x)).all()):
            observed = observed.astype("int64")
    return observed.astype("str")


def categorical_profile(values: pd.Series, limit: int = MAX_CATEGORIES) -> dict[str, Any]:
    """Missing share and the counts of the ``limit`` most frequent categories (as text)."""
    n = len(values)
    observed = as_text(values)
    counts = observed.value_counts(sort=True)
    top = counts.iloc[:limit]
    return {"kind": "categorical", "rows": n, "observed": int(len(observed)),
            "missing": float(1 - len(observed) / n) if n else 0.0,
            "counts": {str(k): int(v) for k, v in top.items()},
            "other": int(counts.iloc[limit:].sum())}


def build(frame: pd.DataFrame, y: Any, kinds: dict[str, str], unused: list[str],
          task: str, target: str | None = None) -> dict[str, Any]:
    """The profile of a training split: ``kinds`` maps column -> numeric | categorical."""
    levels = _levels(len(frame.columns))
    skip = set(unused)
    columns: dict[str, Any] = {}
    for col in frame.columns:
        kind = kinds.get(col, "numeric" if pd.api.types.is_numeric_dtype(frame[col])
                         else "categorical")
        stats = (numeric_profile(frame[col], levels) if kind == "numeric"
                 else categorical_profile(frame[col]))
        columns[str(col)] = {**stats, "used": col not in skip}
    ys = pd.Series(np.asarray(y))
    target_stats = (categorical_profile(ys, limit=10_000) if task == "classification"
                    else numeric_profile(ys, levels))
    return {"format": FORMAT, "version": VERSION, "task": task, "rows": int(len(frame)),
            "target": {"name": None if target is None else str(target), **target_stats},
            "columns": columns}


def save(pre: Any, directory: Path) -> None:
    """Write ``pre.profile_`` (if the preprocessing has one) as ``directory/profile.json``."""
    profile = getattr(pre, "profile_", None)
    if profile is not None:
        (Path(directory) / NAME).write_text(json.dumps(profile, separators=(",", ":")))


def load(directory: str | Path) -> dict[str, Any] | None:
    """The profile saved in a bundle folder; None for a model saved before profiles existed."""
    path = Path(directory) / NAME
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_BYTES:
        raise ProfileError(f"model artifact: {NAME} is {path.stat().st_size:,} bytes; rungwise "
                           f"writes at most a few MB")
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION \
            or not isinstance(doc.get("columns"), dict):
        raise ProfileError(f"model artifact: {NAME} is not a {FORMAT} version {VERSION} file")
    return doc
