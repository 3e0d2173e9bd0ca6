"""The model bundle: saves, loads safely, and predicts on raw rows with missing values."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pandas as pd
import pytest

from jobs.spec import load_spec
from tests.conftest import EXAMPLES
from trainer.bundle import ModelBundle
from trainer.pipeline import load_and_prepare
from trainer.run import train_run


@pytest.fixture(scope="module")
def trained():
    spec = load_spec(EXAMPLES / "adult.yaml", {"train.epochs": 1, "model.hidden": [8]})
    prepared = load_and_prepare(spec.data, spec.impute)
    return spec, prepared, train_run(spec.model, spec.train, prepared)


def test_round_trip_predicts_the_same(tmp_path, trained):
    spec, prepared, result = trained
    rows = prepared.example
    assert rows.isna().any(axis=1).any()  # the example holds missing values
    before = result.bundle.predict(rows)
    loaded = ModelBundle.load(result.bundle.save(tmp_path / "b"))
    assert list(loaded.predict(rows)) == list(before)
    assert set(before) <= {"<=50K", ">50K"}


def test_evaluate_on_raw_rows_matches_the_run(trained):
    spec, prepared, result = trained
    from trainer.pipeline import split_data

    test = split_data(spec.data).splits.test
    metrics = result.bundle.evaluate(test.drop(columns=["income"]), test["income"])
    assert metrics["test_accuracy"] == pytest.approx(result.test_metrics["test_accuracy"])


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/x')}",))


def test_a_tampered_preprocessor_is_refused(tmp_path, trained, monkeypatch):
    _, _, result = trained
    folder = result.bundle.save(tmp_path / "b")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    (folder / "preprocessor.pkl").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        ModelBundle.load(folder)
    assert not marker.exists()


def test_tampered_weights_are_refused(tmp_path, trained):
    _, _, result = trained
    folder = result.bundle.save(tmp_path / "b")
    (folder / "weights.pt").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError):
        ModelBundle.load(folder)


def test_unseen_category_and_missing_column_values(trained):
    _, prepared, result = trained
    rows = prepared.example.copy()
    rows.loc[0, "workclass"] = "Never-seen-before"
    rows.loc[1, "age"] = np.nan
    out = result.bundle.predict(rows)
    assert len(out) == len(rows) and pd.Series(out).notna().all()
