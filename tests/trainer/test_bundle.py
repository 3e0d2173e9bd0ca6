"""The model bundle: saves, loads safely, and predicts on raw rows with missing values."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest

from jobs.spec import load_spec
from tests.conftest import EXAMPLES
from trainer.bundle import ModelBundle
from trainer.pipeline import load_and_prepare
from trainer.preprocessor_state import PreprocessorFormatError
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

    test = split_data(spec.data).test
    metrics = result.bundle.evaluate(test.drop(columns=["income"]), test["income"])
    assert metrics["test_accuracy"] == pytest.approx(result.test_metrics["test_accuracy"])


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/x')}",))


def test_a_planted_pickle_is_never_read(tmp_path, trained, monkeypatch):
    _, prepared, result = trained
    folder = result.bundle.save(tmp_path / "b")
    assert sorted(p.name for p in folder.iterdir()) == [
        "bundle.json", "preprocessor.json", "preprocessor.npz", "profile.json", "weights.pt"]
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    (folder / "preprocessor.pkl").write_bytes(pickle.dumps(_Evil()))
    loaded = ModelBundle.load(folder)
    assert list(loaded.predict(prepared.example)) == list(result.bundle.predict(prepared.example))
    assert not marker.exists()


def test_an_old_pickle_artifact_is_refused_with_advice(tmp_path, trained, monkeypatch):
    _, _, result = trained
    folder = result.bundle.save(tmp_path / "b")
    for name in ("preprocessor.json", "preprocessor.npz"):
        (folder / name).unlink()
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    (folder / "preprocessor.pkl").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(PreprocessorFormatError, match="no longer loads.*re-register the model"):
        ModelBundle.load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("tamper", [
    lambda d: d.update(format="pickle"),
    lambda d: d.update(kind="callable"),
    lambda d: d["state"]["target"]["classes_"].update(dtype="O"),
    lambda d: d["state"]["imputer"]["dtypes_"][0].__setitem__(1, {"numpy": "object"}),
    lambda d: d["state"]["imputer"]["params"].update(numeric="os.system"),
    lambda d: d["state"]["imputer"]["params"].update(fill_value={"__reduce__": "x"}),
])
def test_a_tampered_description_is_an_error(tmp_path, trained, tamper):
    _, _, result = trained
    folder = result.bundle.save(tmp_path / "b")
    doc = json.loads((folder / "preprocessor.json").read_text())
    tamper(doc)
    (folder / "preprocessor.json").write_text(json.dumps(doc))
    with pytest.raises(PreprocessorFormatError, match="model artifact"):
        ModelBundle.load(folder)


def test_an_object_array_in_the_npz_is_not_unpickled(tmp_path, trained, monkeypatch):
    _, _, result = trained
    folder = result.bundle.save(tmp_path / "b")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    with np.load(folder / "preprocessor.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["encoder_mean_"] = np.array([_Evil()], dtype=object)
    with open(folder / "preprocessor.npz", "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(PreprocessorFormatError, match="allow_pickle=False"):
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


@pytest.mark.parametrize(("example", "overrides"), [
    ("california_housing.yaml", {"impute.numeric": "model"}),  # regression, model imputer
    ("digits.yaml", {"model.channels": [4], "model.hidden": [8]}),  # images, int labels
])
def test_other_kinds_round_trip(tmp_path, example, overrides):
    spec = load_spec(EXAMPLES / example, {"train.epochs": 1, **overrides})
    prepared = load_and_prepare(spec.data, spec.impute)
    bundle = train_run(spec.model, spec.train, prepared).bundle
    loaded = ModelBundle.load(bundle.save(tmp_path / "b"))
    rows = prepared.example if prepared.example is not None else prepared.x_test[:20]
    np.testing.assert_array_equal(loaded.predict(rows), bundle.predict(rows))
    assert loaded.classes() == bundle.classes() if spec.data.task == "classification" else True
