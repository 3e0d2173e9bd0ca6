"""Drift statistics and verdicts (tuning/drift.py) on real adult rows, without MLflow.

The reference is the profile of 5,000 training rows (trainer/profile.py) plus a column that is
95% missing; new data are other adult rows, with one shift injected at a time. The values of
the statistics are checked against SciPy and NumPy on the same arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from jobs.quality import check
from trainer import profile as profiles
from tuning.drift import (
    DriftSpec,
    categorical_stats,
    compare,
    decile_edges,
    ks_pvalue,
    numeric_stats,
    psi,
    table,
    two_proportion_pvalue,
)

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
           "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
           "hours_per_week", "native_country", "income"]
TRAIN = 5000
SEEDS = 20


def _with_sparse(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = rng.gamma(2.0, 3.0, len(frame))
    out = frame.copy()
    out["sparse"] = np.where(rng.random(len(frame)) < 0.95, np.nan, values)
    return out


@pytest.fixture(scope="module")
def adult() -> tuple[dict[str, Any], pd.DataFrame]:
    """(profile of the training rows, a pool of 15,000 other rows); target ``income``."""
    frame = pd.read_csv(ROOT / "data" / "adult" / "adult-train.csv.gz", header=None,
                        names=COLUMNS, na_values=["?"], skipinitialspace=True, nrows=20_000)
    train, pool = _with_sparse(frame.iloc[:TRAIN], 0), _with_sparse(frame.iloc[TRAIN:], 1)
    x = train.drop(columns=["income"])
    kinds = {c: "numeric" if pd.api.types.is_numeric_dtype(x[c]) else "categorical"
             for c in x.columns}
    return profiles.build(x, train["income"], kinds, [], "classification", "income"), pool


def sample(pool: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return pool.sample(n, replace=True, random_state=seed).reset_index(drop=True)


# --- the statistics against SciPy / NumPy ------------------------------------------------


def test_numeric_statistics_match_scipy_and_numpy_on_the_same_arrays() -> None:
    rng = np.random.default_rng(0)
    ref, new = rng.normal(0, 1, 4000), rng.normal(0.3, 1.2, 1500)
    prof = profiles.numeric_profile(pd.Series(ref))
    value, d, p = numeric_stats(prof, new)
    edges = decile_edges(prof)
    bins = np.r_[-np.inf, edges, np.inf]
    # np.histogram's bins are [a, b); shift by a hair so that they are (a, b] as in the profile
    a = np.histogram(ref, bins + 1e-12)[0] / len(ref)
    b = np.histogram(new, bins + 1e-12)[0] / len(new)
    assert value == pytest.approx(float(np.sum((b - a) * np.log(b / a))), rel=1e-9)
    assert np.allclose(a, 0.1, atol=1e-3)  # the bins are the training deciles
    ks = stats.ks_2samp(ref, new, method="asymp")
    assert abs(d - ks.statistic) <= 1 / profiles.QUANTILES + 1e-9  # quantile resolution
    assert ks_pvalue(ks.statistic, len(ref), len(new)) == pytest.approx(ks.pvalue, rel=1e-9)
    assert p < 1e-6 and ks.pvalue < 1e-6


def test_categorical_statistics_match_scipy_and_numpy() -> None:
    ref = pd.Series(["a"] * 500 + ["b"] * 300 + ["c"] * 200)
    new = pd.Series(["a"] * 250 + ["b"] * 150 + ["d"] * 100)
    prof = profiles.categorical_profile(ref)
    value, p = categorical_stats(prof, new)
    a, b = np.array([0.5, 0.3, 0.2, 1e-4]), np.array([0.5, 0.3, 1e-4, 0.2])  # a, b, c, unseen
    assert value == pytest.approx(float(np.sum((b - a) * np.log(b / a))), rel=1e-9)
    table_ = np.array([[500, 300, 200, 0], [250, 150, 0, 100]])
    assert p == pytest.approx(stats.chi2_contingency(table_)[1], rel=1e-9)
    # the missing-share test is the chi-square test of the 2x2 table without correction
    p2 = two_proportion_pvalue(0.05, 2000, 0.08, 1000)
    want = stats.chi2_contingency(np.array([[100, 1900], [80, 920]]), correction=False)[1]
    assert p2 == pytest.approx(want, rel=1e-9)
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0


# --- injected shifts ----------------------------------------------------------------------


def _one_column(new: pd.DataFrame, column: str, values: Any) -> pd.DataFrame:
    out = new.copy()
    out[column] = values
    return out


def shifted(pool: pd.DataFrame, kind: str, seed: int = 0) -> tuple[pd.DataFrame, str]:
    new = sample(pool, 1000, seed)
    rng = np.random.default_rng(seed)
    if kind == "mean shift":  # +1 standard deviation of age
        return _one_column(new, "age", new["age"] + pool["age"].std()), "age"
    if kind == "vanished category":  # no 'Married-civ-spouse' any more, the rest as before
        rest = pool["marital_status"][pool["marital_status"] != "Married-civ-spouse"]
        return _one_column(new, "marital_status", rest.sample(
            len(new), replace=True, random_state=seed).to_numpy()), "marital_status"
    if kind == "missingness spike":  # 40% of hours_per_week missing (none in training)
        hours = new["hours_per_week"].where(rng.random(len(new)) >= 0.4)
        return _one_column(new, "hours_per_week", hours), "hours_per_week"
    if kind == "new category":  # 15% of workclass is a value never seen in training
        work = new["workclass"].where(rng.random(len(new)) >= 0.15, "Space-agency")
        return _one_column(new, "workclass", work), "workclass"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["mean shift", "vanished category", "missingness spike",
                                  "new category"])
def test_an_injected_shift_is_found_in_exactly_its_column(
        adult: tuple[dict[str, Any], pd.DataFrame], kind: str) -> None:
    prof, pool = adult
    detected = 0
    for seed in range(5):
        new, column = shifted(pool, kind, seed)
        report = compare(prof, new.drop(columns=["income"]), DriftSpec())
        assert report.drifted == [column], (kind, seed, "\n".join(table(report)))
        detected += 1
    lines = table(report)
    assert lines[-1] == f"drift: {column}"
    row = next(line for line in lines if line.startswith(column + " "))
    assert "DRIFT" in row
    if kind == "new category":
        assert "'Space-agency'" in "\n".join(lines)
    print(f"{kind}: detected in {detected} of 5 samples")


def test_changed_schema_fails_the_quality_gate_one_line_per_problem(
        adult: tuple[dict[str, Any], pd.DataFrame]) -> None:
    prof, pool = adult
    new = sample(pool, 500, 0).drop(columns=["education"])
    new["age"] = new["age"].astype(str).where(new.index % 7 != 0, "unknown")
    new["fnlwgt"] = np.nan
    new.loc[:3, "income"] = ">100K"
    problems = check(new, "income", "classification", prof)
    assert len(problems) == 4, problems
    assert any("'education' (used by the model) is missing" in p for p in problems)
    assert any("'age' was numeric in training, now holds text" in p and "'unknown'" in p
               for p in problems)
    assert any("'fnlwgt': 100% missing now, 0% in training" in p for p in problems)
    assert any("classes the champion never saw: '>100K' (4 rows)" in p for p in problems)
    assert check(sample(pool, 500, 1), "income", "classification", prof) == []
    no_target = check(new.drop(columns=["income"]), "income", "classification", prof)
    assert no_target[0] == "target: column 'income' is not in the new data"
    unlabelled = sample(pool, 500, 2)
    unlabelled.loc[unlabelled.index[:3], "income"] = None  # training refuses these rows too
    assert check(unlabelled, "income", "classification", prof) == [
        "target: 'income' is missing in 3 of 500 rows; label every row or drop unlabelled rows"]


def test_integer_codes_read_the_same_with_or_without_a_missing_value() -> None:
    """pandas stores an integer column with one missing value as floats (9 -> 9.0): profile
    and comparison read both as '9', so that alone is neither drift nor a new class."""
    rng = np.random.default_rng(0)
    codes = pd.Series(rng.integers(1, 6, 2000))  # int64, nothing missing
    target = pd.Series(rng.integers(0, 2, 2000))
    prof = profiles.build(pd.DataFrame({"grade": codes}), target, {"grade": "categorical"}, [],
                          "classification", target="label")
    assert set(prof["columns"]["grade"]["counts"]) == {"1", "2", "3", "4", "5"}
    new = pd.DataFrame({"grade": pd.Series(rng.integers(1, 6, 2000)).astype("float64"),
                        "label": pd.Series(rng.integers(0, 2, 2000)).astype("float64")})
    new.loc[0, "grade"] = np.nan
    report = compare(prof, new, DriftSpec())
    (grade,) = [c for c in report.columns if c.name == "grade"]
    assert grade.unseen == {} and not grade.moved, table(report)
    assert check(new, "label", "classification", prof) == []


# --- no false alarms --------------------------------------------------------------------


@pytest.mark.parametrize("rows", [300, 3000])
def test_same_distribution_resamples_raise_at_most_one_false_alarm_in_20_seeds(
        adult: tuple[dict[str, Any], pd.DataFrame], rows: int) -> None:
    prof, pool = adult
    alarms, judged = [], 0
    for seed in range(SEEDS):
        report = compare(prof, sample(pool, rows, seed).drop(columns=["income"]), DriftSpec())
        alarms += [(seed, c.name) for c in report.columns if c.moved]
        judged += sum(c.psi is not None for c in report.columns)
        sparse = next(c for c in report.columns if c.name == "sparse")
        assert not sparse.moved
    print(f"{rows} rows x {SEEDS} seeds: {len(alarms)} false alarms in {judged} judged "
          f"columns: {alarms}")
    assert len(alarms) <= 1, alarms
    if rows == 3000:  # ~150 observed values of the 95%-missing column: judged, not flagged
        assert sparse.psi is not None


def test_unused_columns_are_shown_but_never_trigger(
        adult: tuple[dict[str, Any], pd.DataFrame]) -> None:
    prof, pool = adult
    prof = {**prof, "columns": {**prof["columns"],
                                "sparse": {**prof["columns"]["sparse"], "used": False}}}
    new = sample(pool, 3000, 0)
    new["sparse"] = new["sparse"].fillna(100.0)  # moved a lot: missing 95% -> 0%, values
    new["row_id"] = np.arange(len(new))  # not a feature at all
    report = compare(prof, new.drop(columns=["income"]), DriftSpec())
    assert report.drifted == [] and report.last_line() == "no drift"
    lines = "\n".join(table(report))
    assert "moved (unused, no trigger)" in lines
    assert "unused: not a model feature, no reference" in lines


def test_thresholds_come_from_the_spec() -> None:
    from jobs.spec import SpecError, validate_spec

    raw = {"name": "x", "data": {"path": "x.csv"},
           "schedule": {"trigger": "drift", "drift": {"psi": 0.1, "min_rows": 20}}}
    spec = validate_spec(raw, None)
    assert spec.schedule.trigger == "drift" and spec.schedule.drift.psi == 0.1
    assert validate_spec({"name": "x", "data": {"path": "x.csv"}}, None).schedule.drift == \
        DriftSpec()
    with pytest.raises(SpecError, match=r"schedule.drift.psy: unknown key; allowed: alpha, "
                                        r"min_rows, missing, psi"):
        validate_spec({**raw, "schedule": {"drift": {"psy": 0.1}}}, None)
    with pytest.raises(SpecError, match="schedule.trigger"):
        validate_spec({**raw, "schedule": {"trigger": "sometimes"}}, None)
