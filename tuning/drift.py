"""Data drift: new rows against the profile of the data a model was trained on (trainer/profile).

Per column: the population stability index (PSI) over the training deciles (numbers) or the
categories (categories; new ones pooled in one bucket), a two-sample test (Kolmogorov-Smirnov
for numbers, chi-square for categories), the missing share then and now, and the categories
never seen in training.

The rule (thresholds in ``schedule.drift``), written so that small samples raise no false
alarms: a column has **drifted** when

- its values moved: at least ``min_rows`` observed values on both sides, PSI above ``psi``
  *and* the test rejects "same distribution" at level ``alpha``; or
- its missing share moved: by more than ``missing`` (absolute) *and* a two-proportion z-test
  rejects at level ``alpha``.

PSI alone is noisy on small samples (with no change its expected value is about
(bins - 1) x (1/n_train + 1/n_new): 0.18 for 50 observed values); a test alone flags changes too
small to matter in large samples. Columns the model does not use are judged and shown, but never
count as drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from trainer.config import StrictSection
from trainer.profile import as_text

EPS = 1e-4
"""Floor on a bin's share in the PSI: an empty bin counts as 0.01%."""
PSI_BINS = 10
UNSEEN = "(unseen)"
OTHER = "(other)"


class DriftSpec(StrictSection):
    """``schedule.drift``: thresholds for `rungwise drift` and ``schedule.trigger: drift``."""

    psi: float = Field(default=0.2, gt=0)
    """Population stability index above which a column's values may have moved."""
    alpha: float = Field(default=0.01, gt=0, lt=1)
    """Significance level of the two-sample and missing-share tests."""
    missing: float = Field(default=0.1, gt=0, le=1)
    """Change in the missing share (absolute) above which missingness may have moved."""
    min_rows: int = Field(default=50, ge=2)
    """Observed values needed on each side to judge a column's values at all."""


@dataclass
class ColumnDrift:
    name: str
    kind: str
    used: bool
    missing_then: float | None
    missing_now: float
    psi: float | None = None
    ks: float | None = None
    pvalue: float | None = None
    unseen: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def moved(self) -> bool:
        return bool(self.reasons)

    @property
    def drifted(self) -> bool:
        """Moved and used by the model: what triggers."""
        return self.moved and self.used

    def verdict(self) -> str:
        if self.moved:
            return ("DRIFT" if self.used else "moved (unused, no trigger)") + \
                f": {', '.join(self.reasons)}"
        return self.note or "ok"


@dataclass
class DriftReport:
    columns: list[ColumnDrift]
    rows: int
    reference_rows: int

    @property
    def drifted(self) -> list[str]:
        return [c.name for c in self.columns if c.drifted]

    def last_line(self) -> str:
        return f"drift: {', '.join(self.drifted)}" if self.drifted else "no drift"

    def summary(self) -> str:
        used = sum(c.used for c in self.columns)
        return f"{len(self.drifted)} of {used} columns moved"


# --- statistics -------------------------------------------------------------------------


def psi(p_ref: np.ndarray, p_new: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    a = np.clip(np.asarray(p_ref, dtype=np.float64), EPS, None)
    b = np.clip(np.asarray(p_new, dtype=np.float64), EPS, None)
    return float(np.sum((b - a) * np.log(b / a)))


def ks_pvalue(d: float, n_ref: int, n_new: int) -> float:
    """Smirnov's asymptotic two-sided p-value, as ``scipy.stats.ks_2samp(method="asymp")``."""
    from scipy.stats import kstwo

    m, n = sorted([float(n_ref), float(n_new)], reverse=True)
    return float(np.clip(kstwo.sf(d, np.round(m * n / (m + n))), 0.0, 1.0))


def two_proportion_pvalue(p1: float, n1: int, p2: float, n2: int) -> float:
    """Two-sided pooled z-test that two shares are equal."""
    from scipy.stats import norm

    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0 if p1 == p2 else 0.0
    return float(2 * norm.sf(abs(p1 - p2) / se))


def decile_edges(ref: dict[str, Any]) -> np.ndarray:
    """Distinct inner decile values among the profile's quantiles."""
    q = np.asarray(ref["quantiles"], dtype=np.float64)
    idx = np.linspace(0, len(q) - 1, PSI_BINS + 1).round().astype(int)[1:-1]
    return np.unique(q[idx])


def numeric_stats(ref: dict[str, Any], x: np.ndarray) -> tuple[float, float, float]:
    """(PSI over the training deciles, KS distance, its p-value) of observed values ``x``."""
    q = np.asarray(ref["quantiles"], dtype=np.float64)
    cdf_ref = np.asarray(ref["cdf"], dtype=np.float64)
    xs = np.sort(x)
    edges = decile_edges(ref)
    f_ref = np.interp(edges, q, cdf_ref)  # exact: every edge is one of the stored quantiles
    f_new = np.searchsorted(xs, edges, side="right") / len(xs)
    p_ref, p_new = np.diff(np.r_[0.0, f_ref, 1.0]), np.diff(np.r_[0.0, f_new, 1.0])
    d = float(np.max(np.abs(cdf_ref - np.searchsorted(xs, q, side="right") / len(xs))))
    return psi(p_ref, p_new), d, ks_pvalue(d, int(ref["observed"]), len(xs))


def category_table(ref: dict[str, Any], values: pd.Series) -> tuple[list[str], np.ndarray,
                                                                     np.ndarray]:
    """Buckets (training categories, pooled rest, unseen) with training and new counts."""
    counts = values.value_counts()
    known = list(ref["counts"])
    names = known + ([OTHER] if ref.get("other") else []) + [UNSEEN]
    ref_counts = [ref["counts"][k] for k in known] + ([ref["other"]] if ref.get("other") else [])
    ref_counts.append(0)
    new_known = [int(counts.get(k, 0)) for k in known]
    rest = int(counts.sum()) - sum(new_known)
    new_counts = new_known + ([rest, 0] if ref.get("other") else [rest])
    return names, np.asarray(ref_counts, dtype=np.float64), np.asarray(new_counts, np.float64)


def categorical_stats(ref: dict[str, Any], values: pd.Series) -> tuple[float, float]:
    """(PSI over the categories, chi-square p-value) of observed category values."""
    from scipy.stats import chi2_contingency

    _, a, b = category_table(ref, values)
    value = psi(a / a.sum(), b / b.sum())
    keep = (a + b) > 0
    if keep.sum() < 2:
        return value, 1.0
    return value, float(chi2_contingency(np.vstack([a[keep], b[keep]]))[1])


# --- one column, a report -----------------------------------------------------------------


def compare_column(name: str, ref: dict[str, Any], new: pd.Series,
                   th: DriftSpec) -> ColumnDrift:
    kind = ref["kind"]
    if kind == "numeric":
        raw = pd.to_numeric(new, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        x = raw[np.isfinite(raw)]
        observed = len(x)
    else:
        values = as_text(new)
        observed = len(values)
    now = 1 - observed / len(new) if len(new) else 0.0
    col = ColumnDrift(name, kind, bool(ref.get("used", True)), float(ref["missing"]), now)
    if kind == "categorical":
        col.unseen = {str(k): int(v) for k, v in values[~values.isin(list(ref["counts"]))]
                      .value_counts().items()} if not ref.get("other") else {}
    if min(observed, int(ref["observed"])) < th.min_rows:
        col.note = f"too few values to judge ({min(observed, int(ref['observed']))} < " \
                   f"min_rows {th.min_rows})"
    elif kind == "numeric":
        col.psi, col.ks, col.pvalue = numeric_stats(ref, x)
    else:
        col.psi, col.pvalue = categorical_stats(ref, values)
    if col.psi is not None and col.psi > th.psi and (col.pvalue or 0.0) < th.alpha:
        col.reasons.append(f"psi {col.psi:.3f} > {th.psi:g}")
    moved = abs(now - col.missing_then) > th.missing  # type: ignore[operator]
    if moved and two_proportion_pvalue(col.missing_then or 0.0, int(ref["rows"]), now,
                                       len(new)) < th.alpha:
        col.reasons.append(f"missing {col.missing_then:.1%} -> {now:.1%}")
    return col


def compare(profile: dict[str, Any], frame: pd.DataFrame, th: DriftSpec) -> DriftReport:
    """Every profiled column that the new rows have, and the new rows' other columns (shown,
    no reference: never drift). Absent columns are the quality gate's business."""
    out = [compare_column(name, ref, frame[name], th)
           for name, ref in profile["columns"].items() if name in frame.columns]
    target = (profile.get("target") or {}).get("name")
    for name in frame.columns:
        if name not in profile["columns"] and name != target:
            kind = "numeric" if pd.api.types.is_numeric_dtype(frame[name]) else "categorical"
            out.append(ColumnDrift(str(name), kind, False, None, float(frame[name].isna().mean()),
                                   note="unused: not a model feature, no reference"))
    return DriftReport(out, len(frame), int(profile.get("rows", 0)))


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table(report: DriftReport) -> list[str]:
    """One line per column, then the last line ``drift: a, b`` or ``no drift``."""
    width = max([6, *(len(c.name) for c in report.columns)])
    head = f"{'column':<{width}}  {'kind':<11}  {'psi':>7}  {'ks':>6}  {'p':>8}  " \
           f"{'missing then -> now':>19}  {'unseen':>6}  verdict"
    lines = [head]
    for c in report.columns:
        unseen = str(sum(c.unseen.values())) if c.kind == "categorical" else "-"
        miss = f"{_share(c.missing_then)} -> {_share(c.missing_now)}"
        lines.append(f"{c.name:<{width}}  {c.kind:<11}  {_num(c.psi):>7}  {_num(c.ks):>6}  "
                     f"{_num(c.pvalue, '.2g'):>8}  {miss:>19}  {unseen:>6}  {c.verdict()}")
        if c.unseen:
            shown = ", ".join(f"{k!r} ({v})" for k, v in list(c.unseen.items())[:5])
            lines.append(f"{'':<{width}}  never seen in training: {shown}")
    lines.append(report.last_line())
    return lines
