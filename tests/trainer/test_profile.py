"""The training profile (trainer/profile.py): fitted with the preprocessing, saved with the
bundle, bounded in size, and absent (None, not a crash) from bundles saved before it existed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs.spec import load_spec
from tests.conftest import EXAMPLES
from trainer import profile
from trainer.pipeline import prepare, split_data


@pytest.fixture(scope="module")
def prepared_adult():
    spec = load_spec(EXAMPLES / "adult.yaml", {"impute.drop_columns_above": 0.5})
    raw = split_data(spec.data)
    train = raw.train.copy()
    train["workclass"] = train["workclass"].where(np.arange(len(train)) % 10 == 0)  # 90% NA
    raw.train = train
    return raw, prepare(raw, spec.impute)


def test_the_profile_describes_the_training_split_only(prepared_adult) -> None:
    raw, prepared = prepared_adult
    prof = prepared.preprocessor.profile_
    train = raw.train
    assert prof["rows"] == len(train) and prof["task"] == "classification"
    assert prof["target"]["name"] == "income"
    assert prof["target"]["counts"] == {str(k): int(v) for k, v in
                                        train["income"].value_counts().items()}
    age = prof["columns"]["age"]
    assert age["kind"] == "numeric" and age["used"] is True
    assert age["quantiles"][0] == train["age"].min() and age["quantiles"][-1] == train[
        "age"].max()
    assert age["quantiles"][100] == pytest.approx(train["age"].median())
    assert age["cdf"][-1] == 1.0
    ages = np.sort(train["age"].to_numpy())
    assert age["cdf"][50] == np.searchsorted(ages, age["quantiles"][50], "right") / len(ages)
    work = prof["columns"]["workclass"]  # dropped by drop_columns_above: profiled, unused
    assert work["used"] is False and work["missing"] == pytest.approx(
        train["workclass"].isna().mean())
    assert sum(prof["columns"]["sex"]["counts"].values()) == len(train)


def test_saved_with_the_bundle_bounded_and_read_back(prepared_adult, tmp_path: Path) -> None:
    _, prepared = prepared_adult
    profile.save(prepared.preprocessor, tmp_path)
    text = (tmp_path / profile.NAME).read_text()
    assert len(text) < 60_000  # 22,793 training rows, 14 columns
    assert profile.load(tmp_path) == json.loads(text) == prepared.preprocessor.profile_
    wide = pd.DataFrame(np.random.default_rng(0).normal(size=(2000, 400)),
                        columns=[f"c{i}" for i in range(400)])
    big = profile.build(wide, np.zeros(2000), {}, [], "regression")
    assert len(json.dumps(big)) < 3_000_000 and len(big["columns"]["c0"]["quantiles"]) < 200


def test_an_old_bundle_has_no_profile_and_a_foreign_file_is_refused(tmp_path: Path) -> None:
    assert profile.load(tmp_path) is None
    (tmp_path / profile.NAME).write_text('{"format": "something-else"}')
    with pytest.raises(profile.ProfileError, match="profile.json is not a rungwise-profile"):
        profile.load(tmp_path)
