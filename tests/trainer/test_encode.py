"""Tests for trainer.encode: TabularEncoder, TargetEncoder and the Preprocessor chain."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import NotFittedError

from trainer import preprocessor_state
from trainer.encode import Preprocessor, TabularEncoder, TargetEncoder
from trainer.impute import Imputer, MissingAtPredictionError


def imputed_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [20.0, 30.0, 40.0, 50.0],
            "color": pd.array(["red", "blue", "red", "green"], dtype="str"),
            "const": [5.0, 5.0, 5.0, 5.0],
            "age__missing": np.array([0, 1, 0, 0], dtype=np.float32),
        },
        index=[10, 11, 12, 13],
    )


def raw_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [20.0, np.nan, 40.0, 50.0, 35.0, np.nan],
            "color": pd.array(["red", "blue", None, "green", "red", "blue"], dtype="str"),
        },
        index=list("abcdef"),
    )


# ------------------------------------------------------------------ TabularEncoder
def test_tabular_encoder_layout_and_values():
    enc = TabularEncoder()
    assert enc.fit(imputed_frame()) is enc
    assert enc.feature_names_out_ == ["age", "color=blue", "color=green", "color=red", "const",
                                      "age__missing"]
    x = enc.transform(imputed_frame())
    assert x.dtype == np.float32 and x.shape == (4, 6)
    age = (np.array([20, 30, 40, 50]) - 35) / np.std([20, 30, 40, 50])
    np.testing.assert_allclose(x[:, 0], age, rtol=1e-6)
    np.testing.assert_array_equal(x[:, 1:4], [[0, 0, 1], [1, 0, 0], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(x[:, 4], 0.0)  # std 0 -> scale 1, so no NaN
    assert enc.scale_[enc.numeric_columns_.index("const")] == 1.0
    np.testing.assert_allclose(x[:, 5], (np.array([0, 1, 0, 0]) - 0.25) / np.sqrt(0.1875),
                               rtol=1e-6)


def test_tabular_encoder_unseen_category_gives_zero_block_and_uses_training_stats():
    enc = TabularEncoder().fit(imputed_frame())
    test = pd.DataFrame({"age": [1035.0], "color": pd.array(["purple"], dtype="str"),
                         "const": [7.0], "age__missing": np.float32([1]), "other": ["x"]})
    x = enc.transform(test)
    assert x.shape == (1, 6)
    assert x[0, 1:4].tolist() == [0.0, 0.0, 0.0]
    assert x[0, 0] == pytest.approx(1000 / np.std([20, 30, 40, 50]))
    assert x[0, 4] == pytest.approx(2.0)


def test_tabular_encoder_errors():
    with pytest.raises(NotFittedError):
        TabularEncoder().transform(imputed_frame())
    enc = TabularEncoder().fit(imputed_frame())
    with pytest.raises(ValueError, match="columns seen in fit are missing: color"):
        enc.transform(imputed_frame().drop(columns="color"))
    bad = imputed_frame().assign(age=[1.0, np.nan, 2.0, 3.0])
    with pytest.raises(ValueError, match="impute before encoding"):
        enc.transform(bad)


def test_tabular_encoder_object_categories_and_pickle():
    df = pd.DataFrame({"k": pd.Series([1, "b", 1, None], dtype=object)})
    enc = TabularEncoder().fit(df)
    assert enc.feature_names_out_ == ["k=1", "k=b"]
    x = pickle.loads(pickle.dumps(enc)).transform(df)
    np.testing.assert_array_equal(x, [[1, 0], [0, 1], [1, 0], [0, 0]])


# ------------------------------------------------------------------- TargetEncoder
def test_target_encoder_classification_round_trip():
    te = TargetEncoder().fit(pd.Series(["yes", "no", "maybe", "no"]), "classification")
    assert list(te.classes_) == ["maybe", "no", "yes"]
    assert te.output_dim_ == 3
    codes = te.transform(pd.Series(["no", "yes", "maybe"]))
    assert codes.dtype == np.int64 and codes.tolist() == [1, 2, 0]
    assert te.inverse_transform(codes).tolist() == ["no", "yes", "maybe"]
    with pytest.raises(ValueError, match="not seen in training: 'perhaps'"):
        te.transform(["no", "perhaps"])


def test_target_encoder_keeps_original_label_values():
    te = TargetEncoder().fit(pd.Series([3, 1, 2, 3]), "classification")
    assert te.classes_.tolist() == [1, 2, 3]
    assert te.transform([3, 1]).tolist() == [2, 0]
    assert te.inverse_transform(np.array([2, 0])).tolist() == [3, 1]


def test_target_encoder_regression_standardises_and_inverts():
    y = pd.Series([10.0, 20.0, 30.0, 40.0])
    te = TargetEncoder().fit(y, "regression")
    assert te.mean_ == 25.0 and te.scale_ == pytest.approx(np.std(y))
    z = te.transform(y)
    assert z.dtype == np.float32
    assert z.mean() == pytest.approx(0, abs=1e-6) and z.std() == pytest.approx(1)
    np.testing.assert_allclose(te.inverse_transform(z), y, rtol=1e-6)
    assert TargetEncoder().fit(pd.Series([2.0, 2.0]), "regression").scale_ == 1.0


def test_target_encoder_errors():
    with pytest.raises(NotFittedError):
        TargetEncoder().transform([1])
    with pytest.raises(ValueError, match="data.task: got 'ranking'"):
        TargetEncoder().fit(pd.Series([1, 2]), "ranking")
    with pytest.raises(ValueError, match="1 missing values"):
        TargetEncoder().fit(pd.Series([1.0, np.nan]), "regression")


# -------------------------------------------------------------------- Preprocessor
def test_preprocessor_classification_end_to_end(tmp_path):
    X, y = raw_frame(), pd.Series(list("ABABAB"), index=list("abcdef"))
    pre = Preprocessor(Imputer(numeric="mean", categorical="category", indicator=True),
                       "classification")
    assert pre.fit(X, y) is pre
    x, yy = Preprocessor(Imputer(numeric="mean", categorical="category", indicator=True),
                         "classification").fit_transform(X, y)
    assert pre.feature_names_out_ == ["age", "color=__missing__", "color=blue", "color=green",
                                      "color=red", "age__missing", "color__missing"]
    assert x.shape == (6, 7) and x.dtype == np.float32 and not np.isnan(x).any()
    assert yy.tolist() == [0, 1, 0, 1, 0, 1]
    preprocessor_state.save(pre, tmp_path)  # what the registered model holds
    served = preprocessor_state.load(tmp_path)
    raw = pd.DataFrame({"age": [np.nan], "color": pd.array([None], dtype="str")}, index=["p"])
    xp, yp, idx = served.transform(raw)
    assert yp is None and list(idx) == ["p"]
    assert xp[0, 1] == 1.0 and xp[0, 0] == pytest.approx(0.0, abs=1e-6)  # mean-filled -> 0
    assert served.inverse_transform_target([1, 0]).tolist() == ["B", "A"]


def test_preprocessor_drop_rows_and_drop_missing():
    X, y = raw_frame(), pd.Series([1.0, 2, 3, 4, 5, 6], index=list("abcdef"))
    pre = Preprocessor(Imputer(numeric="drop_rows", categorical="mode"), "regression")
    x, yy = pre.fit_transform(X, y)
    assert x.shape[0] == 4
    assert pre.target_encoder_.mean_ == pytest.approx(np.mean([1, 3, 4, 5]))  # aligned rows
    np.testing.assert_allclose(pre.inverse_transform_target(yy), [1, 3, 4, 5], rtol=1e-6)
    xv, yv, idx = pre.transform(X, y, drop_missing=True)
    assert list(idx) == ["a", "c", "d", "e"] and xv.shape == (4, x.shape[1])
    np.testing.assert_allclose(pre.inverse_transform_target(yv), [1, 3, 4, 5], rtol=1e-6)
    with pytest.raises(MissingAtPredictionError, match="rows b, f"):
        pre.transform(X)


def test_preprocessor_rejects_misaligned_target_and_unfitted_use():
    X = raw_frame()
    pre = Preprocessor(Imputer(), "classification")
    with pytest.raises(NotFittedError):
        pre.transform(X)
    with pytest.raises(ValueError, match="same index"):
        pre.fit(X, pd.Series(list("ABABAB")))
    with pytest.raises(ValueError, match="y has 2 rows but X has 6"):
        pre.fit(X, ["A", "B"])
    with pytest.raises(ValueError, match="data.task: got 'rank'"):
        Preprocessor(Imputer(), "rank").fit(X, list("ABABAB"))
