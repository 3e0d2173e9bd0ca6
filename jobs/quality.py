"""The data quality gate: checks on new data before any retrain trains on it.

Against the champion's training profile (trainer/profile.py) when there is one:

- the target column is present, labelled in every row (as training requires), and
  (classification) holds no class the champion never saw;
- the schema is compatible: every column the model uses is present and a number column still
  holds numbers;
- no column is suddenly (near) all missing.

Each problem is one line; an empty list means the data may be trained on.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from trainer.profile import as_text

NEAR_ALL_MISSING = 0.98
"""A column missing in at least this share now ..."""
WAS_PRESENT = 0.5
"""... and in at most this share in training is 'suddenly all missing'."""


def check(frame: pd.DataFrame, target: str, task: str,
          profile: dict[str, Any] | None) -> list[str]:
    """One line per problem of ``frame`` (the new data, as read) against ``profile``."""
    problems = _target(frame, target, task, profile)
    columns = (profile or {}).get("columns") or {}
    for name, ref in columns.items():
        if name not in frame.columns:
            if ref.get("used", True):
                problems.append(f"schema: column {name!r} (used by the model) is missing from "
                                "the new data")
            continue
        problems += _column(name, frame[name], ref)
    if profile is None:  # no reference: only what is wrong in any case
        problems += [f"column {c!r}: every value is missing" for c in frame.columns
                     if c != target and len(frame) and frame[c].isna().all()]
    return problems


def _target(frame: pd.DataFrame, target: str, task: str,
            profile: dict[str, Any] | None) -> list[str]:
    if target not in frame.columns:
        return [f"target: column {target!r} is not in the new data"]
    y = frame[target]
    missing = int(y.isna().sum())
    if missing or not len(y):  # as the loader: every row must be labelled
        return [f"target: {target!r} is missing in {missing} of {len(y)} rows; label every "
                "row or drop unlabelled rows"]
    known = ((profile or {}).get("target") or {}).get("counts")
    if task != "classification" or not known:
        return []
    seen = as_text(y).value_counts()
    new = {k: int(v) for k, v in seen.items() if k not in known}
    if not new:
        return []
    shown = ", ".join(f"{k!r} ({v} rows)" for k, v in list(new.items())[:10])
    return [f"target: classes the champion never saw: {shown}; trained on "
            f"{', '.join(map(repr, list(known)[:10]))}"]


def _column(name: str, values: pd.Series, ref: dict[str, Any]) -> list[str]:
    out = []
    if ref["kind"] == "numeric" and not pd.api.types.is_numeric_dtype(values):
        observed = values[values.notna()]
        words = observed[pd.to_numeric(observed, errors="coerce").isna()]
        if len(words):
            out.append(f"schema: column {name!r} was numeric in training, now holds text "
                       f"(e.g. {str(words.iloc[0])[:40]!r}, {len(words)} rows)")
    now = float(values.isna().mean()) if len(values) else 1.0
    if now >= NEAR_ALL_MISSING and float(ref["missing"]) <= WAS_PRESENT:
        out.append(f"column {name!r}: {now:.0%} missing now, {float(ref['missing']):.0%} in "
                   "training")
    return out
