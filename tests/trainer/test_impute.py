"""Contract tests for trainer.impute.Imputer, run over every (numeric, categorical) strategy."""

from __future__ import annotations

import copy
import pickle
import warnings
from itertools import product

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.exceptions import NotFittedError
from sklearn.impute import SimpleImputer

from trainer import model_impute, preprocessor_state
from trainer.encode import Preprocessor, TabularEncoder
from trainer.impute import (
    CATEGORICAL_STRATEGIES,
    MISSING,
    NUMERIC_STRATEGIES,
    Imputer,
    MissingAtPredictionError,
)

COMBOS = list(product(NUMERIC_STRATEGIES, CATEGORICAL_STRATEGIES))


def train_frame() -> pd.DataFrame:
    """Ten rows; age and work have missing values, hours/flag/edu do not."""
    return pd.DataFrame(
        {
            "age": [30.0, np.nan, 40.0, 50.0, np.nan, 20.0, 35.0, 45.0, 60.0, 25.0],
            "hours": [40, 38, 50, 40, 20, 45, 40, 60, 40, 35],
            "flag": [True, False, True, True, False, False, True, True, False, True],
            "work": pd.array(["priv", None, "gov", "priv", "self", None, "priv", "gov",
                              "priv", "self"], dtype="str"),
            "edu": pd.array(["hs", "ba", "hs", "ms", "ba", "hs", "hs", "ba", "ms", "hs"],
                            dtype="str"),
        },
        index=pd.RangeIndex(100, 110),
    )


def holdout_frame() -> pd.DataFrame:
    """Rows unlike training: extreme numerics, unseen categories, missing only where fillable."""
    return pd.DataFrame(
        {
            "age": [1e9, np.nan],
            "hours": [1_000_000, 1],
            "flag": [False, True],
            "work": pd.array(["alien", None], dtype="str"),
            "edu": pd.array(["phd", "hs"], dtype="str"),
            "extra": [1, 2],
        },
        index=["t0", "t1"],
    )


def fillable_test_frame(numeric: str, categorical: str) -> pd.DataFrame:
    """The test frame without missing values in columns a drop_rows strategy cannot fill."""
    df = holdout_frame()
    if numeric == "drop_rows":
        df["age"] = [1e9, -1e9]
    if categorical == "drop_rows":
        df["work"] = pd.array(["alien", "priv"], dtype="str")
    return df


def expected_stat(s: pd.Series, strategy: str, fill_value=None):
    """Reference statistic computed independently with numpy / collections."""
    values = s.dropna()
    if strategy == "mean":
        return float(np.mean(values.to_numpy(dtype=float)))
    if strategy == "median":
        return float(np.median(values.to_numpy(dtype=float)))
    if strategy == "mode":
        counts = values.value_counts()
        return min(counts.index[counts == counts.max()])
    if strategy == "constant":
        return fill_value
    if strategy == "category":
        return MISSING
    raise AssertionError(strategy)


@pytest.mark.parametrize(("numeric", "categorical"), COMBOS)
def test_fit_returns_self_and_sets_fitted_attributes(numeric, categorical):
    imp = Imputer(numeric=numeric, categorical=categorical)
    assert imp.fit(train_frame()) is imp
    assert imp.numeric_columns_ == ["age", "hours", "flag"]
    assert imp.categorical_columns_ == ["work", "edu"]
    assert imp.missing_fraction_ == {"age": 0.2, "hours": 0.0, "flag": 0.0, "work": 0.2,
                                     "edu": 0.0}
    assert imp.feature_names_in_ == list(train_frame().columns)


@pytest.mark.parametrize(("numeric", "categorical"), COMBOS)
def test_transform_before_fit_raises_not_fitted(numeric, categorical):
    with pytest.raises(NotFittedError):
        Imputer(numeric=numeric, categorical=categorical).transform(train_frame())


@pytest.mark.parametrize(("numeric", "categorical"), COMBOS)
def test_output_nan_free_with_index_and_dtypes(numeric, categorical):
    imp = Imputer(numeric=numeric, categorical=categorical)
    out = imp.fit_transform(train_frame())
    test_out = imp.transform(fillable_test_frame(numeric, categorical))
    for frame in (out, test_out):
        assert not frame.isna().to_numpy().any()
        assert list(frame.columns) == ["age", "hours", "flag", "work", "edu"]
        assert [frame[c].dtype for c in ("age", "hours", "flag")] == [np.float64] * 3
        assert all(isinstance(frame[c].dtype, pd.StringDtype) for c in ("work", "edu"))
    assert list(test_out.index) == ["t0", "t1"]
    dropped = (({101, 104} if numeric == "drop_rows" else set())
               | ({101, 105} if categorical == "drop_rows" else set()))
    assert set(out.index) == set(range(100, 110)) - dropped


@pytest.mark.parametrize(("numeric", "categorical"), COMBOS)
def test_no_leakage_statistics_come_from_training_rows_only(numeric, categorical):
    train = train_frame()
    imp = Imputer(numeric=numeric, categorical=categorical, fill_value=None).fit(train)
    before = copy.deepcopy(imp.statistics_)
    out = imp.transform(fillable_test_frame(numeric, categorical))
    assert imp.statistics_ == before
    # Statistics are those of the surviving training rows, computed independently.
    rows = train.drop(index=imp.droppable_rows(train))
    if numeric not in ("drop_rows", "model"):
        default = 0.0 if numeric == "constant" else None
        assert imp.statistics_["age"] == pytest.approx(expected_stat(rows["age"], numeric, default))
        assert out.loc["t1", "age"] == pytest.approx(imp.statistics_["age"])
    if numeric == "model":  # initial fill = training mean, never the 1e9 test row
        assert imp.statistics_["age"] == pytest.approx(rows["age"].mean())
        assert 0 < out.loc["t1", "age"] < 100
    if categorical != "drop_rows":
        cat_default = MISSING
        assert imp.statistics_["work"] == expected_stat(rows["work"], categorical, cat_default)
        assert out.loc["t1", "work"] == imp.statistics_["work"]
    assert out.loc["t0", "work"] == "alien"  # unseen categories pass through untouched


def test_statistics_match_manual_values():
    imp = Imputer(numeric="median", categorical="mode").fit(train_frame())
    assert imp.statistics_["age"] == 37.5
    assert imp.statistics_["work"] == "priv"
    assert imp.statistics_["hours"] == 40.0
    imp = Imputer(numeric="mean", categorical="constant", fill_value=-1).fit(train_frame())
    assert imp.statistics_["age"] == pytest.approx(38.125)
    assert imp.statistics_["work"] == "-1"


@pytest.mark.parametrize(("numeric", "categorical"), COMBOS)
def test_indicator_columns_present_and_correct(numeric, categorical):
    train = train_frame()
    imp = Imputer(numeric=numeric, categorical=categorical, indicator=True)
    out = imp.fit_transform(train)
    expected = [c for c, kind in (("age", numeric), ("work", categorical)) if kind != "drop_rows"]
    names = [f"{c}__missing" for c in expected]
    assert imp.indicator_columns_ == names
    assert list(out.columns) == ["age", "hours", "flag", "work", "edu", *names]
    for col in expected:
        flag = out[f"{col}__missing"]
        assert flag.dtype == np.float32
        np.testing.assert_array_equal(flag.to_numpy(), train.loc[out.index, col].isna())
    test = fillable_test_frame(numeric, categorical)
    test_out = imp.transform(test)
    for col in expected:
        np.testing.assert_array_equal(test_out[f"{col}__missing"], test[col].isna())


def test_drop_columns_above_uses_strict_threshold():
    df = train_frame()
    df["sparse"] = [1.0] * 3 + [np.nan] * 7  # 70% missing
    imp = Imputer(drop_columns_above=0.6).fit(df)
    assert imp.dropped_columns_ == ["sparse"]
    assert "sparse" not in imp.transform(df.drop(columns="sparse")).columns
    assert Imputer(drop_columns_above=0.7).fit(df).dropped_columns_ == []
    plan = {row["column"]: row for row in Imputer(drop_columns_above=0.6).describe_plan(df)}
    assert plan["sparse"]["action"] == "drop column (missing 70% > 60%)"


def test_all_missing_column_dropped_with_warning():
    df = train_frame()
    df["empty"] = np.nan
    with pytest.warns(UserWarning, match="no observed value in training: empty"):
        imp = Imputer(indicator=True).fit(df)
    assert imp.dropped_columns_ == ["empty"]
    assert "empty" not in imp.transform(df).columns
    assert "empty__missing" not in imp.indicator_columns_


def test_drop_rows_drops_training_rows_only_and_refuses_at_prediction():
    train = train_frame()
    imp = Imputer(numeric="drop_rows", categorical="mode")
    out = imp.fit_transform(train)
    assert list(out.index) == [100, 102, 103, 105, 106, 107, 108, 109]
    assert imp.statistics_["work"] == "priv"  # from the surviving rows
    test = pd.DataFrame({"age": [np.nan, 1.0, np.nan], "hours": [1, np.nan, 2],
                         "flag": [True, True, False], "work": pd.array(["x"] * 3, dtype="str"),
                         "edu": pd.array(["hs"] * 3, dtype="str")}, index=["a", "b", "c"])
    assert list(imp.droppable_rows(test)) == ["a", "b", "c"]
    with pytest.raises(MissingAtPredictionError) as err:
        imp.transform(test)
    msg = str(err.value)
    assert msg.startswith(
        "3 rows have missing values in drop_rows columns (age, hours): rows a, b, c;"
    )
    assert "impute.numeric=drop_rows" in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)
    assert len(imp.transform(test.drop(index=imp.droppable_rows(test)))) == 0


def test_drop_rows_message_caps_row_labels_at_five():
    imp = Imputer(numeric="median", categorical="drop_rows").fit(train_frame())
    test = pd.concat([train_frame()] * 2, ignore_index=True)
    with pytest.raises(MissingAtPredictionError, match=r"4 rows .*\(work\): rows 1, 5, 11, 15;"):
        imp.transform(test)
    test = pd.concat([train_frame()] * 3, ignore_index=True)
    with pytest.raises(MissingAtPredictionError, match=r"6 rows.*: rows 1, 5, 11, 15, 21, \.\.\.;"):
        imp.transform(test)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"numeric": "avg"}, "impute.numeric: got 'avg', allowed: mean, median, mode, constant, "
                             "model, drop_rows"),
        ({"categorical": "median"}, "impute.categorical: got 'median', allowed: mode, constant, "
                                    "category, drop_rows"),
        ({"drop_columns_above": 1.5}, "impute.drop_columns_above: got 1.5"),
        ({"drop_columns_above": 0}, "impute.drop_columns_above: got 0"),
        ({"indicator": "yes"}, "impute.indicator: got 'yes'"),
        ({"numeric": "constant", "fill_value": "x"}, "impute.fill_value: got 'x'"),
    ],
)
def test_bad_parameters_raise_value_error_naming_the_key(kwargs, message):
    imp = Imputer(**kwargs)  # __init__ only stores
    assert imp.get_params()[next(iter(kwargs))] == next(iter(kwargs.values()))
    with pytest.raises(ValueError) as err:
        imp.fit(train_frame())
    assert str(err.value).startswith(message)


def test_transform_ignores_extra_and_rejects_missing_columns():
    imp = Imputer().fit(train_frame())
    out = imp.transform(holdout_frame())
    assert "extra" not in out.columns
    with pytest.raises(ValueError, match="columns seen in fit are missing: hours, edu"):
        imp.transform(train_frame().drop(columns=["hours", "edu"]))


def test_prediction_rows_with_object_dtypes_are_cast_back():
    """Raw rows from a served model arrive as object columns full of None."""
    imp = Imputer(numeric="median", categorical="mode").fit(train_frame())
    raw = pd.DataFrame([{"age": None, "hours": 40, "flag": None, "work": None, "edu": "hs"},
                        {"age": None, "hours": 41, "flag": True, "work": None, "edu": "ba"}])
    out = imp.transform(raw)
    assert out["age"].tolist() == [37.5, 37.5] and out["age"].dtype == np.float64
    assert out["flag"].tolist() == [1.0, 1.0]  # median of the training flags, then True
    assert out["work"].tolist() == ["priv", "priv"]
    assert isinstance(out["work"].dtype, pd.StringDtype)


def test_mode_ties_take_the_smallest_value():
    df = pd.DataFrame({"x": [3.0, 1.0, 3.0, 1.0, np.nan, 2.0],
                       "c": pd.array(["b", "a", "b", "a", None, "c"], dtype="str")})
    imp = Imputer(numeric="mode", categorical="mode").fit(df)
    assert imp.statistics_ == {"x": 1.0, "c": "a"}


def test_object_and_nullable_columns_are_cast():
    df = pd.DataFrame({"c": pd.Series(["a", None, pd.NA, "a"], dtype=object),
                       "n": pd.array([1, None, 3, 3], dtype="Int64"),
                       "f": np.array([1.0, np.nan, 2.0, 2.0], dtype=np.float32)})
    imp = Imputer(numeric="mode", categorical="category")
    out = imp.fit_transform(df)
    assert out["c"].tolist() == ["a", MISSING, MISSING, "a"]
    assert isinstance(out["c"].dtype, pd.StringDtype)
    assert out["n"].dtype == np.float64 and out["n"].tolist() == [1.0, 3.0, 3.0, 3.0]
    assert out["f"].dtype == np.float32 and out["f"].tolist() == [1.0, 2.0, 2.0, 2.0]


def test_model_strategy_uses_other_columns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    df = pd.DataFrame({"x": x, "y": 3 * x + 1})
    df.loc[:9, "y"] = np.nan
    out = Imputer(numeric="model").fit_transform(df)
    np.testing.assert_allclose(out.loc[:9, "y"], 3 * x[:10] + 1, atol=0.05)


def test_model_training_rows_are_capped_with_a_fixed_seed(monkeypatch):
    monkeypatch.setattr(model_impute, "MODEL_MAX_ROWS", 20)
    df = pd.DataFrame({"x": np.arange(100.0), "y": np.arange(100.0) % 7})
    a = Imputer(numeric="model").fit(df)
    b = Imputer(numeric="model").fit(df)
    assert a.statistics_ == b.statistics_
    assert a.statistics_["x"] != pytest.approx(49.5)  # mean of a 20-row sample, not of all rows


def test_plan_describes_each_column():
    df = train_frame()
    df["empty"] = np.nan
    imp = Imputer(numeric="median", categorical="category", indicator=True)
    with pytest.warns(UserWarning):
        plan = {row["column"]: row for row in imp.describe_plan(df)}
    assert not hasattr(imp, "statistics_")  # describe_plan leaves self unfitted
    assert plan["age"] == {"column": "age", "kind": "numeric", "missing_fraction": 0.2,
                           "action": "fill median=37.5", "fill": 37.5, "indicator": True}
    assert plan["work"]["action"] == "own category __missing__"
    assert plan["edu"]["action"] == "keep (no missing)"
    assert plan["empty"]["action"] == "drop column (no observed value)"
    imp = Imputer(numeric="drop_rows").fit(train_frame())
    assert imp.plan()[0]["action"] == "drop rows"


@pytest.mark.parametrize(("numeric", "categorical"), COMBOS)
def test_saved_format_round_trip_gives_identical_output(tmp_path, numeric, categorical):
    """Every strategy's fitted imputer survives the artifact format (JSON + npz, no pickle)."""
    train = train_frame()
    imp = Imputer(numeric=numeric, categorical=categorical, indicator=True)
    pre = Preprocessor(imp, "regression").fit(train, pd.Series(np.arange(len(train.index)),
                                                               index=train.index, dtype=float))
    preprocessor_state.save(pre, tmp_path)
    clone = preprocessor_state.load(tmp_path).imputer
    test = fillable_test_frame(numeric, categorical)
    pd.testing.assert_frame_equal(clone.transform(test), imp.transform(test))
    assert clone.statistics_ == imp.statistics_ and clone.dtypes_ == imp.dtypes_


@pytest.mark.parametrize(("numeric", "categorical"), COMBOS)
def test_pickle_round_trip_gives_identical_output(numeric, categorical):
    imp = Imputer(numeric=numeric, categorical=categorical, indicator=True).fit(train_frame())
    clone = pickle.loads(pickle.dumps(imp))
    test = fillable_test_frame(numeric, categorical)
    pd.testing.assert_frame_equal(clone.transform(test), imp.transform(test))
    assert clone.statistics_ == imp.statistics_


@st.composite
def float_columns(draw, elements):
    n_rows = draw(st.integers(1, 25))
    n_cols = draw(st.integers(1, 4))
    values = draw(arrays(np.float64, (n_rows, n_cols), elements=elements))
    missing = draw(arrays(np.bool_, (n_rows, n_cols)))
    values[missing] = np.nan
    return pd.DataFrame(values, columns=[f"c{j}" for j in range(n_cols)])


@pytest.mark.parametrize(
    ("strategy", "elements"),
    [("mean", st.floats(-1e6, 1e6)), ("median", st.floats(-1e6, 1e6)),
     ("mode", st.integers(-3, 3).map(float))],
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_statistics_match_simple_imputer(strategy, elements, data):
    df = data.draw(float_columns(elements))
    sk = "most_frequent" if strategy == "mode" else strategy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SimpleImputer(strategy=sk, keep_empty_features=False).fit(df)
        imp = Imputer(numeric=strategy).fit(df)
        expected = ref.transform(df)
    for j, col in enumerate(df.columns):
        if col in imp.dropped_columns_:
            assert df[col].isna().all() and np.isnan(ref.statistics_[j])
        else:
            assert imp.statistics_[col] == pytest.approx(ref.statistics_[j], rel=1e-9, abs=1e-6)
    kept = imp.transform(df)
    np.testing.assert_allclose(kept.to_numpy(), expected, rtol=1e-9, atol=1e-6)


def test_imputed_frame_with_unseen_category_encodes_to_zeros():
    imp = Imputer(numeric="median", categorical="mode").fit(train_frame())
    enc = TabularEncoder().fit(imp.transform(train_frame()))
    x = enc.transform(imp.transform(holdout_frame()))
    work = [i for i, name in enumerate(enc.feature_names_out_) if name.startswith("work=")]
    assert x[0, work].tolist() == [0.0] * len(work)  # "alien" never seen in training
    assert x[1, work].sum() == 1.0  # missing -> mode "priv"


def test_preprocessor_end_to_end_on_missing_values(tmp_path):
    train = train_frame()
    y = pd.Series(["<=50K", ">50K"] * 5, index=train.index)
    pre = Preprocessor(Imputer(numeric="median", categorical="category", indicator=True),
                       "classification")
    x, yy = pre.fit_transform(train, y)
    assert x.dtype == np.float32 and x.shape == (10, len(pre.feature_names_out_))
    assert yy.tolist() == [0, 1] * 5
    preprocessor_state.save(pre, tmp_path)  # what the registered model holds
    served = preprocessor_state.load(tmp_path)
    xt, yt, idx = served.transform(holdout_frame())
    assert yt is None and list(idx) == ["t0", "t1"] and not np.isnan(xt).any()
    np.testing.assert_array_equal(xt, pre.transform(holdout_frame())[0])


def test_the_model_imputer_replays_iterative_imputer_exactly():
    """``ChainImputer`` (plain arrays) fills exactly what scikit-learn's IterativeImputer does."""
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 5))
    x[:, 1] += 2 * x[:, 0]
    x[rng.random(x.shape) < 0.2] = np.nan
    chain = model_impute.fit_chain(x.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = IterativeImputer(random_state=model_impute.MODEL_SEED,
                                     keep_empty_features=True).fit(x.copy())
    test = rng.normal(size=(200, 5))
    test[rng.random(test.shape) < 0.3] = np.nan
    test[0] = np.nan  # a row with nothing observed
    np.testing.assert_array_equal(chain.transform(test.copy()), reference.transform(test.copy()))
    assert len(chain.feature) == 5 * reference.n_iter_


def test_the_model_imputer_on_one_numeric_column():
    """IterativeImputer only fills the mean when there is one column (it sets no clip bounds):
    the copied-out imputer does the same instead of failing on a missing attribute."""
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    x = np.array([[1.0], [np.nan], [3.0], [5.0]])
    chain = model_impute.fit_chain(x.copy())
    reference = IterativeImputer(random_state=model_impute.MODEL_SEED,
                                 keep_empty_features=True).fit(x.copy())
    test = np.array([[np.nan], [2.0]])
    np.testing.assert_array_equal(chain.transform(test.copy()), reference.transform(test.copy()))
    assert chain.transform(test)[0, 0] == 3.0
    frame = pd.DataFrame({"a": [1.0, None, 3.0, 5.0], "c": ["x", "y", None, "x"]})
    filled = Imputer(numeric="model").fit(frame).transform(frame)
    assert filled["a"].tolist() == [1.0, 3.0, 3.0, 5.0]
