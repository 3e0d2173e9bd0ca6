"""`rungwise predict` on new data (#12): with or without a header row, with or without the
target, CSV or Parquet; the output keeps the input's columns and adds ``prediction`` (and
``probability_<class>`` with ``--proba``); a word in a numeric column names its row and column.

One model (adult, 2,000 rows, 1 epoch) is trained and registered for the module; the commands
run in this process through ``jobs.cli.main``, as the console script does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs.cli import main
from tests.registered import ADULT, COLUMNS, LABELS, Registered, train_and_register

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    return train_and_register(tmp_path_factory.mktemp("predict"), name="adult-predict")


@pytest.fixture(scope="module")
def new_rows(model: Registered) -> pd.DataFrame:
    """30 rows of the training file as text, as a new file would hold them (`?` = missing)."""
    lines = model.data.read_text().splitlines()[:30]
    return pd.DataFrame([[v.strip() for v in ln.split(",")] for ln in lines], columns=COLUMNS)


def predict(model: Registered, path: Path, *extra: str) -> int:
    args = ["predict", str(ADULT), "--input", str(path)]
    for s in model.sets:
        args += ["--set", s]
    return main([*args, *extra])


def run(model: Registered, frame: pd.DataFrame, name: str, header: bool,
        *extra: str) -> pd.DataFrame:
    path = model.folder / name
    out = model.folder / f"out-{name}.csv"
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False, header=header)
    assert predict(model, path, "--output", str(out), *extra) == 0
    return pd.read_csv(out)


def test_header_less_file_like_the_training_file(model: Registered,
                                                 new_rows: pd.DataFrame) -> None:
    out = run(model, new_rows, "full.csv", header=False)
    assert list(out.columns) == [*COLUMNS, "prediction"]
    assert len(out) == len(new_rows) and set(out["prediction"]) <= LABELS
    assert out["income"].tolist() == new_rows["income"].tolist()


def test_without_the_target_with_or_without_header_csv_or_parquet(
        model: Registered, new_rows: pd.DataFrame) -> None:
    """The same rows give the same predictions however the file is laid out."""
    full = run(model, new_rows, "ref.csv", header=False)["prediction"].tolist()
    features = new_rows.drop(columns=["income"])
    bare = run(model, features, "bare.csv", header=False)
    assert list(bare.columns) == [*COLUMNS[:-1], "prediction"]
    assert bare["prediction"].tolist() == full
    headed = run(model, features, "headed.csv", header=True)
    assert headed["prediction"].tolist() == full
    typed = features.replace("?", None).astype({"age": "float64", "fnlwgt": "int64"})
    assert run(model, typed, "rows.parquet", header=True)["prediction"].tolist() == full
    shuffled = features[list(reversed(features.columns))]  # a header may order them freely
    assert run(model, shuffled, "shuffled.csv", header=True)["prediction"].tolist() == full


def test_proba_columns(model: Registered, new_rows: pd.DataFrame) -> None:
    out = run(model, new_rows.drop(columns=["income"]), "proba.csv", True, "--proba")
    probs = out[["probability_<=50K", "probability_>50K"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    picked = np.where(probs[:, 1] > probs[:, 0], ">50K", "<=50K")
    assert (picked == out["prediction"].to_numpy()).all()


def test_absent_optional_column_is_missing_values(model: Registered,
                                                  new_rows: pd.DataFrame) -> None:
    features = new_rows.drop(columns=["income"])
    absent = run(model, features.drop(columns=["native_country"]), "absent.csv", True)
    nulls = run(model, features.assign(native_country="?"), "nulls.csv", True)
    assert "native_country" not in absent.columns
    assert absent["prediction"].tolist() == nulls["prediction"].tolist()


def test_a_word_in_a_numeric_column_names_row_and_column(
        model: Registered, new_rows: pd.DataFrame, capsys: pytest.CaptureFixture[str]) -> None:
    bad = new_rows.drop(columns=["income"]).copy()
    bad.loc[2, "age"] = "abc"
    path = model.folder / "abc.csv"
    bad.to_csv(path, index=False)
    out = model.folder / "abc-out.csv"
    capsys.readouterr()
    assert predict(model, path, "--output", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"rungwise: error: --input: {path}: row 3 (line 4), column 'age': 'abc' is "
                   "not a number"), err
    assert not out.exists()


def test_a_header_less_file_of_the_wrong_width(model: Registered, new_rows: pd.DataFrame,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = model.folder / "narrow.csv"
    new_rows.iloc[:, :5].to_csv(path, index=False, header=False)
    capsys.readouterr()
    assert predict(model, path) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"rungwise: error: --input: {path} has 5 columns and no header row; "
                   "expected 15 (data.columns) or 14 (without 'income'), or a header row "
                   "that names the columns"), err
