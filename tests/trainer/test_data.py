"""trainer.data: reading CSV / Parquet / .npz, the schema, the seeded split, and every
``DataError`` with the spec key its one-line message names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from jobs.spec import DataSpec, load_spec
from tests.conftest import write_file
from trainer.data import (
    MAX_CATEGORIES,
    DataError,
    Images,
    fingerprint,
    infer_schema,
    read_images,
    read_table,
    select,
    split,
)
from trainer.pipeline import split_data

ROOT = Path(__file__).resolve().parents[2]
CSV = "age,color,zip,y\n" + "".join(
    f"{20 + i % 40},{('red', 'green', 'blue')[i % 3]},{1000 + i % 5},{'yes' if i % 2 else 'no'}\n"
    for i in range(60))


def data_spec(path: Path | str, **kw: Any) -> DataSpec:
    return DataSpec(path=str(path), **kw)


def write(tmp_path: Path, text: str | bytes, name: str = "t.csv") -> Path:
    return write_file(tmp_path, text, name)


def refusal(data: DataSpec) -> str:
    """The one-line DataError of reading + schema + split, as split_data does them."""
    with pytest.raises(DataError) as info:
        split_data(data)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --- reading ------------------------------------------------------------------------------


def test_read_csv(tmp_path: Path) -> None:
    df = read_table(data_spec(write(tmp_path, CSV)))
    assert list(df.columns) == ["age", "color", "zip", "y"] and len(df) == 60
    assert pd.api.types.is_numeric_dtype(df["age"]) and pd.api.types.is_numeric_dtype(df["zip"])
    assert not pd.api.types.is_numeric_dtype(df["color"])
    assert df["color"].iloc[:3].tolist() == ["red", "green", "blue"]


def test_read_parquet_gives_the_same_table(tmp_path: Path) -> None:
    from_csv = read_table(data_spec(write(tmp_path, CSV)))
    path = tmp_path / "t.parquet"
    from_csv.to_parquet(path)
    from_parquet = read_table(data_spec(path))
    pd.testing.assert_frame_equal(from_parquet, from_csv, check_dtype=False)
    assert fingerprint(select(from_parquet, infer_schema(from_parquet, data_spec(path)))) == \
        fingerprint(select(from_csv, infer_schema(from_csv, data_spec(path))))


def test_format_can_be_declared(tmp_path: Path) -> None:
    path = tmp_path / "table.bin"
    read_table(data_spec(write(tmp_path, CSV))).to_parquet(path)
    assert len(read_table(data_spec(path, format="parquet"))) == 60


def test_na_values_become_missing_however_they_are_spaced(tmp_path: Path) -> None:
    """adult writes ``, ?``: the value is `` ?`` until stripped."""
    text = "age, work, y\n30, ?, a\n?, gov, b\n41, priv, a\n52, NA?, b\n"
    df = read_table(data_spec(write(tmp_path, text), na_values=["?"]))
    assert list(df.columns) == ["age", "work", "y"]  # header spaces stripped too
    assert df["work"].isna().tolist() == [True, False, False, False]
    assert df["work"].tolist()[1:] == ["gov", "priv", "NA?"]
    assert df["age"].isna().tolist() == [False, True, False, False]
    assert pd.api.types.is_numeric_dtype(df["age"])  # "?" gone: the column is numbers


def test_without_na_values_a_question_mark_is_a_value(tmp_path: Path) -> None:
    df = read_table(data_spec(write(tmp_path, "w,y\n?,a\ngov,b\n")))
    assert df["w"].tolist() == ["?", "gov"]


def test_headerless_csv_with_columns(tmp_path: Path) -> None:
    body = "".join(CSV.splitlines(keepends=True)[1:])
    df = read_table(data_spec(write(tmp_path, body), columns=["a", "c", "z", "label"],
                              target="label"))
    assert list(df.columns) == ["a", "c", "z", "label"] and len(df) == 60
    assert df["a"].iloc[0] == 20


@pytest.mark.parametrize("columns", [["a", "c", "label"], ["a", "c", "z", "label", "extra"],
                                     ["a", "a", "z", "label"]])
def test_columns_must_name_each_column_once(tmp_path: Path, columns: list[str]) -> None:
    """Fewer names than columns used to turn the surplus into the index, silently."""
    body = "".join(CSV.splitlines(keepends=True)[1:])
    msg = refusal(data_spec(write(tmp_path, body), columns=columns, target="label"))
    assert msg.startswith(f"data.columns: {len(columns)} names for the 4 columns of ")


def test_other_delimiter(tmp_path: Path) -> None:
    df = read_table(data_spec(write(tmp_path, CSV.replace(",", ";")), delimiter=";"))
    assert list(df.columns) == ["age", "color", "zip", "y"]


# --- schema --------------------------------------------------------------------------------


def test_inferred_categorical_is_the_text_columns(tmp_path: Path) -> None:
    data = data_spec(write(tmp_path, CSV))
    schema = infer_schema(read_table(data), data)
    assert schema.numeric == ["age", "zip"] and schema.categorical == ["color"]
    assert schema.features == ["age", "zip", "color"] and schema.target == "y"


def test_declared_categorical_wins_and_is_selected_as_text(tmp_path: Path) -> None:
    data = data_spec(write(tmp_path, CSV), categorical=["color", "zip"])
    df = read_table(data)
    schema = infer_schema(df, data)
    assert schema.numeric == ["age"] and schema.categorical == ["color", "zip"]
    frame = select(df, schema)
    assert not pd.api.types.is_numeric_dtype(frame["zip"])
    assert frame["zip"].iloc[0] == "1000"


def test_features_restrict_the_columns(tmp_path: Path) -> None:
    data = data_spec(write(tmp_path, CSV), features=["color", "age"])
    df = read_table(data)
    schema = infer_schema(df, data)
    assert schema.features == ["age", "color"]
    assert list(select(df, schema).columns) == ["age", "color", "y"]


# --- split -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adult() -> tuple[pd.DataFrame, Any, Any]:
    data = load_spec(ROOT / "examples" / "adult.yaml").data
    df = read_table(data)
    schema = infer_schema(df, data)
    return select(df, schema), schema, data


def test_split_is_seeded(adult: tuple[pd.DataFrame, Any, Any]) -> None:
    frame, schema, data = adult
    a, b = split(frame, schema, data.split), split(frame, schema, data.split)
    for part_a, part_b in zip(a, b, strict=True):  # train, val, test
        assert part_a.index.equals(part_b.index)
    other = split(frame, schema, data.split.model_copy(update={"seed": 1}))
    assert not other[2].index.equals(a[2].index)


def test_split_sizes_disjoint_and_complete(adult: tuple[pd.DataFrame, Any, Any]) -> None:
    frame, schema, data = adult
    train, val, test = split(frame, schema, data.split)
    n = len(frame)
    assert (len(test), len(val)) == (round(n * 0.15), round(n * 0.15))
    idx = [set(p.index) for p in (train, val, test)]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert set().union(*idx) == set(frame.index)


def test_split_is_stratified_on_adult(adult: tuple[pd.DataFrame, Any, Any]) -> None:
    frame, schema, data = adult
    overall = frame[schema.target].value_counts(normalize=True)
    assert overall[">50K"] == pytest.approx(0.24, abs=0.01)
    for part in split(frame, schema, data.split):
        shares = part[schema.target].value_counts(normalize=True)
        for label, share in overall.items():
            assert abs(shares[label] - share) < 0.01, (label, shares[label], share)


def test_tiny_class_falls_back_to_an_unstratified_split(tmp_path: Path) -> None:
    rows = "".join(f"{i},{'b' if i < 2 else 'a'}\n" for i in range(40))
    data = data_spec(write(tmp_path, "x,y\n" + rows))
    with pytest.warns(UserWarning, match="data.split.stratify: a class has fewer than 3 rows"):
        sp = split_data(data)
    assert not sp.is_images and len(sp.train) + len(sp.val) + len(sp.test) == 40


# --- every DataError and its message ------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert refusal(data_spec(tmp_path / "nope.csv")) == \
        f"data.path: file not found: {tmp_path / 'nope.csv'}"


def test_directory(tmp_path: Path) -> None:
    assert refusal(data_spec(tmp_path)).startswith(f"data.path: {tmp_path} is a directory")


def test_target_column_absent(tmp_path: Path) -> None:
    msg = refusal(data_spec(write(tmp_path, CSV), target="income"))
    assert msg == "data.target: column 'income' not in the table; columns: age, color, zip, y"


def test_target_with_missing_values(tmp_path: Path) -> None:
    text = CSV.replace(",yes\n", ",\n", 2)
    msg = refusal(data_spec(write(tmp_path, text)))
    assert msg.startswith("data.target: 'y' has 2 missing values (rows 1, 3...)")


def test_target_missing_in_every_row(tmp_path: Path) -> None:
    text = CSV.replace(",yes\n", ",?\n").replace(",no\n", ",?\n")
    msg = refusal(data_spec(write(tmp_path, text), na_values=["?"]))
    assert msg == "data.target: 'y' is missing in every row"


def test_features_naming_absent_columns(tmp_path: Path) -> None:
    msg = refusal(data_spec(write(tmp_path, CSV), features=["age", "height", "weight"]))
    assert msg.startswith("data.features: not in the table: 'height', 'weight'; columns: age")


def test_features_listing_the_target(tmp_path: Path) -> None:
    assert refusal(data_spec(write(tmp_path, CSV), features=["age", "y"])) == \
        "data.features: lists the target 'y'"


def test_no_feature_columns(tmp_path: Path) -> None:
    msg = refusal(data_spec(write(tmp_path, "y\na\nb\n" * 10)))
    assert msg.startswith("data.features: no feature columns")


def test_categorical_not_among_the_features(tmp_path: Path) -> None:
    assert refusal(data_spec(write(tmp_path, CSV), categorical=["shade"])) == \
        "data.categorical: not among the features: 'shade'"


@pytest.mark.parametrize(("text", "suffix"), [("", "is empty"), ("age,color,y\n", "has no rows")])
def test_empty_table(tmp_path: Path, text: str, suffix: str) -> None:
    path = write(tmp_path, text)
    assert refusal(data_spec(path)) == f"data.path: {path} {suffix}"


def test_empty_parquet_table(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pd.DataFrame({"x": pd.Series([], dtype=float), "y": pd.Series([], dtype=str)}).to_parquet(
        path)
    assert refusal(data_spec(path)) == f"data.path: {path} has no rows"


def test_single_class(tmp_path: Path) -> None:
    text = CSV.replace(",no\n", ",yes\n")
    assert refusal(data_spec(write(tmp_path, text))) == \
        "data.target: 'y' has a single class ('yes'); classification needs at least two"


def test_regression_target_not_numeric(tmp_path: Path) -> None:
    assert refusal(data_spec(write(tmp_path, CSV), task="regression")) == \
        "data.target: 'y' is not numeric (e.g. 'no') but data.task is regression"


def test_regression_target_infinite(tmp_path: Path) -> None:
    text = "x,y\n" + "".join(f"{i},{'inf' if i == 3 else i}\n" for i in range(30))
    assert refusal(data_spec(write(tmp_path, text), task="regression")) == \
        "data.target: 'y' has infinite values"


def test_too_many_categories(tmp_path: Path) -> None:
    n = MAX_CATEGORIES + 1
    text = "id,x,y\n" + "".join(f"c{i},{i % 7},{i % 2}\n" for i in range(n))
    msg = refusal(data_spec(write(tmp_path, text)))
    assert msg.startswith(f"data.categorical: column 'id' has {n:,} distinct values "
                          f"(limit {MAX_CATEGORIES:,})")
    # leaving the column out, as the message advises, works
    ok = data_spec(write(tmp_path, text), features=["x"])
    assert split_data(ok).schema.features == ["x"]  # type: ignore[union-attr]


def test_exactly_the_category_limit_is_fine(tmp_path: Path) -> None:
    text = "id,y\n" + "".join(f"c{i},{i % 2}\n" for i in range(MAX_CATEGORIES))
    schema = split_data(data_spec(write(tmp_path, text))).schema
    assert schema is not None and schema.categorical == ["id"]


def test_wrong_delimiter_hint(tmp_path: Path) -> None:
    msg = refusal(data_spec(write(tmp_path, CSV.replace(",", ";"))))
    assert msg.startswith("data.target: column 'y' not in the table; columns: age;color;zip;y")
    assert msg.endswith("(one column was read: check data.delimiter)")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = write(tmp_path, "name,y\ncaf\xe9,a\nbar,b\n".encode("latin-1"))
    assert refusal(data_spec(path)) == (f"data.path: column 'name' of {path} is not UTF-8 text "
                                        "(byte 0xe9); save the file as UTF-8")


def test_non_utf8_header(tmp_path: Path) -> None:
    path = write(tmp_path, "caf\xe9,y\n1,a\n2,b\n".encode("latin-1"))
    assert "not UTF-8" in refusal(data_spec(path))


@pytest.mark.parametrize("column", [[[1, 2], [3]], [{"a": 1}, {"a": 2}]], ids=["list", "struct"])
def test_nested_parquet_column(tmp_path: Path, column: list[Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"nested": column, "y": ["a", "b"]}), path)
    msg = refusal(data_spec(path))
    assert msg.startswith(f"data.path: column 'nested' of {path} is nested")
    assert msg.endswith("only flat columns of numbers or text are supported")


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = write(tmp_path, CSV, name="t.parquet")
    assert refusal(data_spec(path)).startswith(f"data.path: cannot read {path} as parquet: ")


def test_ragged_csv(tmp_path: Path) -> None:
    path = write(tmp_path, CSV + "1,2,3,4,5\n")
    msg = refusal(data_spec(path))
    assert msg.startswith(f"data.path: cannot read {path} as csv: ") and "columns" in msg


def test_too_few_rows_for_the_split(tmp_path: Path) -> None:
    msg = refusal(data_spec(write(tmp_path, "x,y\n1,a\n2,b\n3,a\n")))
    assert msg.startswith("data.split: 3 rows are too few for val=0.15, test=0.15: that makes "
                          "3 train / 0 val / 0 test rows")


# --- images ----------------------------------------------------------------------------------


def save_npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def test_read_images(tmp_path: Path) -> None:
    x = np.arange(40 * 64, dtype=np.uint8).reshape(40, 8, 8)
    images = read_images(data_spec(save_npz(tmp_path, x=x, y=np.arange(40) % 2)))
    assert images.x.shape == (40, 1, 8, 8) and images.x.dtype == np.float32


def test_image_data_splits_into_three_disjoint_image_sets(tmp_path: Path) -> None:
    x = np.arange(40 * 64, dtype=np.float32).reshape(40, 8, 8)  # image i starts with 64 i
    data = split_data(data_spec(save_npz(tmp_path, x=x, y=np.arange(40) % 2)))
    assert data.is_images and data.schema is None and data.task == "classification"
    parts = [p for p in (data.train, data.val, data.test) if isinstance(p, Images)]
    assert [len(p) for p in parts] == [28, 6, 6]
    ids = [(p.x[:, 0, 0, 0] // 64).astype(int) for p in parts]
    assert sorted(np.concatenate(ids)) == list(range(40))  # disjoint and complete
    for p, i in zip(parts, ids, strict=True):  # every label stays with its image
        assert (p.y == i % 2).all()


def test_npz_without_x_and_y(tmp_path: Path) -> None:
    path = save_npz(tmp_path, images=np.zeros((4, 8, 8)), labels=np.zeros(4))
    assert refusal(data_spec(path)) == \
        f"data.path: {path} must hold arrays 'x' and 'y', has images, labels"


def test_npz_with_flat_x(tmp_path: Path) -> None:
    path = save_npz(tmp_path, x=np.zeros((4, 64)), y=np.zeros(4))
    assert refusal(data_spec(path)).startswith("data.path: x must be (N, H, W) or (N, C, H, W)")


def test_npz_with_pickled_objects_is_not_unpickled(tmp_path: Path) -> None:
    path = save_npz(tmp_path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4))
    assert "Object arrays cannot be loaded when allow_pickle=False" in refusal(data_spec(path))


def test_npz_for_regression_is_refused(tmp_path: Path) -> None:
    path = save_npz(tmp_path, x=np.zeros((30, 8, 8)), y=np.arange(30) % 2)
    assert refusal(data_spec(path, task="regression")) == \
        "data.task: image data (.npz) supports classification only"


@pytest.mark.parametrize("content", [b"x,y\n1,2\n", b"\x93NUMPY not a zip"], ids=["text", "npy"])
def test_file_that_is_not_an_npz(tmp_path: Path, content: bytes) -> None:
    """numpy alone would say the file "contains pickled (object) data" and advise
    ``allow_pickle``: the wrong advice for a file that is simply not an .npz."""
    path = write(tmp_path, content, name="d.npz")
    assert refusal(data_spec(path)) == \
        f"data.path: {path} is not an .npz file (a zip of arrays 'x' and 'y')"
