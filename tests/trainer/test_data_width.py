"""Wide tables: the schema is inferred in linear time, and a table wider than MAX_FEATURES is
refused from its header, before pyarrow reads it (100,000 columns took it 160 s and 7.6 GiB)."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import trainer.data as data_mod
from jobs.spec import DataSpec
from trainer.data import MAX_FEATURES, DataError, infer_schema
from trainer.pipeline import split_data


def _header(n: int) -> str:
    return ",".join(f"c{i}" for i in range(n)) + ",y\n"


def _refusal(spec: DataSpec) -> str:
    with pytest.raises(DataError) as info:
        split_data(spec)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("name", ["wide.csv", "wide.csv.gz"])
def test_a_table_wider_than_the_bound_is_refused_from_its_header(tmp_path: Path,
                                                                 name: str) -> None:
    # the body is not CSV at all: reading it would fail with another message
    text = (_header(MAX_FEATURES + 1) + '"unterminated\n1,2\n').encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    msg = _refusal(DataSpec(path=str(path)))
    assert msg == (f"data.path: {path} has {MAX_FEATURES + 1:,} feature columns; the limit is "
                   f"{MAX_FEATURES:,}: list the ones to use in data.features")


def test_a_wide_parquet_is_refused_from_its_footer(tmp_path: Path) -> None:
    n = MAX_FEATURES + 5
    frame = pd.DataFrame(np.zeros((3, n + 1), dtype=np.float32),
                         columns=[f"c{i}" for i in range(n)] + ["y"])
    frame.to_parquet(tmp_path / "wide.parquet")
    msg = _refusal(DataSpec(path=str(tmp_path / "wide.parquet")))
    assert f"has {n:,} feature columns; the limit is {MAX_FEATURES:,}" in msg


def test_a_headerless_csv_counts_its_declared_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("1,2\n")
    names = [f"c{i}" for i in range(MAX_FEATURES + 2)]
    assert f"has {MAX_FEATURES + 1:,} feature columns" in _refusal(
        DataSpec(path=str(path), columns=names))


def test_a_wide_table_with_listed_features_is_read(tmp_path: Path) -> None:
    n = MAX_FEATURES + 10
    rows = "".join(",".join(str((i + r) % 7) for i in range(n)) + f",{r % 2}\n"
                   for r in range(30))
    path = tmp_path / "wide.csv"
    path.write_text(_header(n) + rows)
    raw = split_data(DataSpec(path=str(path), features=["c0", "c5", "c9"]))
    assert raw.schema.features == ["c0", "c5", "c9"]


def test_exactly_the_bound_is_allowed() -> None:
    data = DataSpec(path="t.csv")
    frame = pd.DataFrame(np.zeros((4, MAX_FEATURES), dtype=np.float32))
    frame.columns = [f"c{i}" for i in range(MAX_FEATURES)]
    frame["y"] = [0, 1, 0, 1]
    assert len(infer_schema(frame, data).numeric) == MAX_FEATURES


@pytest.mark.slow
def test_schema_inference_is_linear_in_the_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 columns: 80 s (issue #17) / 200 s here when quadratic; 1.3 s when linear."""
    monkeypatch.setattr(data_mod, "MAX_FEATURES", 10**6)
    n = 100_000
    frame = pd.DataFrame(np.zeros((20, n), dtype=np.float32),
                         columns=[f"c{i}" for i in range(n)])
    frame["y"] = [0, 1] * 10
    text = [f"c{i}" for i in range(0, n, 10)]
    frame[text] = frame[text].astype("str")
    data = DataSpec(path="t.csv")
    t0 = time.perf_counter()
    schema = infer_schema(frame, data)
    took = time.perf_counter() - t0
    assert (len(schema.numeric), len(schema.categorical)) == (n - len(text), len(text))
    assert took < 20, f"{took:.1f} s for {n:,} columns"
