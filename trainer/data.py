"""Reading a table (CSV / Parquet via pyarrow) or images (.npz), its schema, and the split.

The types: ``Schema`` (target and feature columns of a table), ``Images`` (pixels and labels
of an .npz file, or of one split of it) and ``SplitData`` (the three splits, frames or
``Images``, with the schema and the data's fingerprint).

Takes the ``data`` section of the job spec (``trainer.config.DataSpec``; the split, its
``SplitSpec``); no Ray, no MLflow. Every error is a ``DataError`` whose one-line message
names the spec key.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainer.config import DataSpec, SplitSpec
from trainer.errors import RungwiseError

MAX_CATEGORIES = 1000
MAX_FEATURES = 10_000
"""Feature columns of a table, checked from its header before it is read. 10,000 columns of
200 rows read and split in 6 s and 0.5 GiB here, impute + encode in 48 s (column by column),
and an MLP's first layer of 128 units on them is 1.3 M weights; 100,000 took pyarrow 160 s and
7.6 GiB only to read. Wider data is images (.npz) or needs ``data.features``."""


class DataError(RungwiseError):
    """Data that cannot be trained on; the message is one line."""


@dataclass(frozen=True)
class Schema:
    target: str
    task: str
    numeric: list[str]
    categorical: list[str]

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]


@dataclass
class Images:
    """Images (N, C, H, W) float32 and their labels: what ``read_images`` returns from an .npz
    file, and what each split of image data holds."""

    x: np.ndarray
    y: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class SplitData:
    """Train/val/test splits, unfitted: made by ``split_data``, read by ``prepare`` (pipeline).

    A sweep's driver keeps it, and trials get it for an imputation fitted in the trial."""

    train: pd.DataFrame | Images
    """A table's rows (features and target), or ``Images`` for .npz data; so are val, test."""
    val: pd.DataFrame | Images
    test: pd.DataFrame | Images
    schema: Schema | None
    """The table's target and feature columns; None for images."""
    fingerprint: str
    task: str

    @property
    def is_images(self) -> bool:
        return isinstance(self.train, Images)


def detect_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    for suffix, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".npz", "npz")):
        if name.endswith(suffix):
            return fmt
    return "csv"


def _check_exists(path: str) -> None:
    if "://" in path:
        return
    if Path(path).is_dir():
        raise DataError(f"data.path: {path} is a directory; name a CSV, Parquet or .npz file")
    if Path(path).exists() and not Path(path).is_file():
        raise DataError(f"data.path: {path} is not a regular file")
    if not Path(path).is_file():
        raise DataError(f"data.path: file not found: {path}")


def _source(path: str, seekable: bool = False) -> Any:
    """A local path as is; a URI (s3://, gs://, ...) opened through pyarrow's filesystems,
    decompressed by its extension (.gz, ...) unless ``seekable`` (Parquet, .npz)."""
    if "://" not in path:
        return path
    import pyarrow.fs as pafs

    fs, fs_path = pafs.FileSystem.from_uri(path)
    return fs.open_input_file(fs_path) if seekable else \
        fs.open_input_stream(fs_path, compression="detect")


def read_table(data: DataSpec) -> pd.DataFrame:
    """Read the table named by ``data.path`` with pyarrow; ``na_values`` become missing."""
    path = str(data.path)
    _check_exists(path)
    fmt = detect_format(path, data.format)
    if not data.features:  # every column but the target: before reading
        check_width(_count_columns(path, fmt, data) - 1, data)
    try:
        if fmt == "parquet":
            df = pd.read_parquet(_source(path, seekable=True), engine="pyarrow")
        else:
            df = _read_csv(path, data)
    except DataError:
        raise
    except UnicodeDecodeError:
        raise DataError(f"data.path: {path} is not UTF-8 text") from None
    except Exception as exc:  # pyarrow raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "utf8" in first.lower() or "utf-8" in first.lower():
            raise DataError(f"data.path: {path} is not UTF-8 text ({first})") from None
        raise DataError(f"data.path: cannot read {path} as {fmt}: {first}") from None
    _check_flat(df, path)
    return _clean(df, list(data.na_values), path)


def _count_columns(path: str, fmt: str, data: DataSpec) -> int:
    """Columns of the table from its header (CSV) or footer (Parquet) alone: reading 100,000
    columns of 200 rows took pyarrow 160 s and 7.6 GiB here, only to be refused after.
    Unreadable files count as 0: the read that follows says what is wrong with them."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    if data.columns:
        return len(data.columns)
    try:
        if fmt == "parquet":
            return len(pq.read_schema(path).names)
        head = b""
        with pa.input_stream(path, compression="detect") as raw:
            while b"\n" not in head and len(head) < 2**26 and (chunk := raw.read(2**20)):
                head += chunk
        line = head.split(b"\n", 1)[0].decode("utf-8", errors="replace")
        return len(next(csv.reader([line], delimiter=data.delimiter), []))
    except Exception:
        return 0


def _read_csv(path: str, data: DataSpec) -> pd.DataFrame:
    names = list(data.columns) if data.columns else None
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise DataError(f"data.path: {path} is empty")
    df = pd.read_csv(_source(path), engine="pyarrow", sep=data.delimiter,
                     header=None if names else "infer", na_values=list(data.na_values) or None)
    if names is not None:  # pandas would silently turn surplus columns into the index
        if len(names) != df.shape[1] or len(set(names)) != len(names):
            raise DataError(f"data.columns: {len(names)} names for the {df.shape[1]} columns "
                            f"of {path}; give one distinct name per column")
        df.columns = names
    return df


def _check_flat(df: pd.DataFrame, path: str) -> None:
    for col in df.columns:
        dtype = df[col].dtype
        if isinstance(dtype, pd.ArrowDtype) or str(dtype).startswith(("list", "struct")):
            raise DataError(f"data.path: column {col!r} of {path} is nested ({dtype}); "
                            "only flat columns of numbers or text are supported")
        if df[col].dtype == object and len(df) and isinstance(
                df[col].dropna().iloc[0] if df[col].notna().any() else None,
                (list, dict, np.ndarray)):
            raise DataError(f"data.path: column {col!r} of {path} is nested; "
                            "only flat columns of numbers or text are supported")


def _clean(df: pd.DataFrame, na_values: list[str], path: str = "") -> pd.DataFrame:
    """Strip text, turn na_values into missing, and re-type text columns that are numbers.

    pyarrow matches na_values exactly, so ``" ?"`` in a ``", "``-separated file (adult)
    would survive; stripping first makes ``?`` match however the file is spaced.
    """
    df = df.rename(columns=lambda c: str(c).strip())
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            continue
        if not (pd.api.types.is_string_dtype(s) or s.dtype == object):
            continue
        try:  # pyarrow hands over text that is not UTF-8 as bytes
            s = s.astype("str").where(s.notna()).str.strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"data.path: column {col!r} of {path} is not UTF-8 text "
                            f"(byte 0x{exc.object[exc.start]:02x}); save the file as UTF-8"
                            ) from None
        if na_values:
            s = s.mask(s.isin(na_values))
        numeric = pd.to_numeric(s, errors="coerce")
        df[col] = numeric if numeric.notna().sum() == s.notna().sum() and s.notna().any() else s
    return df


def infer_schema(df: pd.DataFrame, data: DataSpec) -> Schema:
    """Target, features and their kinds; raises DataError naming the spec key."""
    if len(df) == 0 or len(df.columns) == 0:
        raise DataError(f"data.path: {data.path} has no rows")
    cols = list(df.columns)
    if data.target not in cols:
        hint = " (one column was read: check data.delimiter)" if len(cols) == 1 else ""
        raise DataError(f"data.target: column {data.target!r} not in the table; "
                        f"columns: {_short(cols)}{hint}")
    features = list(data.features) if data.features else [c for c in cols if c != data.target]
    check_width(len(features), data)
    present = set(cols)  # sets: a list's `in` made this quadratic in the number of columns
    absent = [c for c in features if c not in present]
    if absent:
        raise DataError(f"data.features: not in the table: {_short(list(map(repr, absent)))}; "
                        f"columns: {_short(cols)}")
    if data.target in features:
        raise DataError(f"data.features: lists the target {data.target!r}")
    if not features:
        raise DataError(f"data.features: no feature columns; the table has only the target "
                        f"{data.target!r}")
    declared = list(data.categorical) if data.categorical is not None else None
    if declared is not None:
        wanted = set(features)
        stray = [c for c in declared if c not in wanted]
        if stray:
            raise DataError(f"data.categorical: not among the features: "
                            f"{', '.join(map(repr, stray))}")
        categorical = declared
    else:
        dtypes = dict(zip(df.columns, df.dtypes, strict=True))  # df[c] is slow on wide frames
        categorical = [c for c in features if not pd.api.types.is_numeric_dtype(dtypes[c])]
    is_categorical = set(categorical)
    numeric = [c for c in features if c not in is_categorical]
    schema = Schema(target=data.target, task=data.task, numeric=numeric, categorical=categorical)
    _check_target(df, schema)
    _check_categories(df, schema)
    return schema


def check_width(n_features: int, data: DataSpec) -> None:
    if n_features > MAX_FEATURES:
        raise DataError(f"data.path: {data.path} has {n_features:,} feature columns; the limit "
                        f"is {MAX_FEATURES:,}: list the ones to use in data.features")


def _short(cols: list[str], n: int = 12) -> str:
    more = f", ... ({len(cols)} in all)" if len(cols) > n else ""
    return ", ".join(cols[:n]) + more


def _check_target(df: pd.DataFrame, schema: Schema) -> None:
    y = df[schema.target]
    missing = int(y.isna().sum())
    if missing == len(y):
        raise DataError(f"data.target: {schema.target!r} is missing in every row")
    if missing:
        rows = ", ".join(str(r) for r in y.index[y.isna()][:5])
        raise DataError(f"data.target: {schema.target!r} has {missing} missing values "
                        f"(rows {rows}...); label every row or drop unlabelled rows")
    if schema.task == "regression":
        if not pd.api.types.is_numeric_dtype(y):
            raise DataError(f"data.target: {schema.target!r} is not numeric (e.g. "
                            f"{y.iloc[0]!r}) but data.task is regression")
        if not np.isfinite(y.to_numpy(dtype=float)).all():
            raise DataError(f"data.target: {schema.target!r} has infinite values")
    elif y.nunique() < 2:
        raise DataError(f"data.target: {schema.target!r} has a single class "
                        f"({y.iloc[0]!r}); classification needs at least two")


def _check_categories(df: pd.DataFrame, schema: Schema) -> None:
    for col in schema.categorical:
        n = int(df[col].nunique())
        if n > MAX_CATEGORIES:
            raise DataError(f"data.categorical: column {col!r} has {n:,} distinct values "
                            f"(limit {MAX_CATEGORIES:,}); leave it out of data.features or "
                            "declare it numeric")


def select(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Feature + target columns, categoricals as ``str`` so the imputer sees their kind."""
    out = df[[*schema.features, schema.target]].copy()
    for col in schema.categorical:
        if pd.api.types.is_numeric_dtype(out[col]):
            out[col] = out[col].astype("str").where(out[col].notna())
    return out


def split(df: pd.DataFrame, schema: Schema,
          spec: SplitSpec) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Seeded (train, val, test) split of ``df``, stratified on the target for classification."""
    from sklearn.model_selection import train_test_split  # slow import; only needed here

    n = len(df)
    n_test, n_val = round(n * spec.test), round(n * spec.val)
    n_train = n - n_test - n_val
    if n_train < 2 or n_test < 1 or n_val < 1:
        raise DataError(f"data.split: {n} rows are too few for val={spec.val}, "
                        f"test={spec.test}: that makes {n_train} train / {n_val} val / "
                        f"{n_test} test rows; each split needs rows (train at least 2)")
    strat = df[schema.target] if schema.task == "classification" and spec.stratify else None
    if strat is not None and strat.value_counts().min() < 3:
        warnings.warn("data.split.stratify: a class has fewer than 3 rows; "
                      "splitting without stratification", stacklevel=2)
        strat = None
    rest, test = train_test_split(df, test_size=n_test, random_state=spec.seed, stratify=strat)
    strat_rest = rest[schema.target] if strat is not None else None
    train, val = train_test_split(rest, test_size=n_val, random_state=spec.seed + 1,
                                  stratify=strat_rest)
    return train, val, test


def fingerprint(df: pd.DataFrame) -> str:
    """A short content hash of a frame: same data -> same fingerprint, across runs."""
    h = pd.util.hash_pandas_object(df, index=False).to_numpy()
    cols = ",".join(f"{c}:{df[c].dtype}" for c in df.columns).encode()
    return hashlib.sha256(h.tobytes() + cols).hexdigest()[:16]


def read_images(data: DataSpec) -> Images:
    """Read ``x`` (N, H, W) or (N, C, H, W) and ``y`` from an .npz file."""
    path = str(data.path)
    _check_exists(path)
    if "://" not in path and not zipfile.is_zipfile(path):  # else numpy talks of pickles
        raise DataError(f"data.path: {path} is not an .npz file (a zip of arrays 'x' and 'y')")
    try:
        with np.load(_source(path, seekable=True), allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                raise DataError(f"data.path: {path} must hold arrays 'x' and 'y', "
                                f"has {', '.join(npz.files) or 'none'}")
            x, y = npz["x"], npz["y"]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data.path: cannot read {path} as .npz: {exc}") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) != len(y) or len(x) == 0:
        raise DataError(f"data.path: x must be (N, H, W) or (N, C, H, W) with N == len(y), "
                        f"got x{x.shape} and y{y.shape}")
    if not np.isfinite(x.astype(np.float64)).all():
        raise DataError(f"data.path: x in {path} has missing or infinite pixels")
    return Images(x=x.astype(np.float32), y=y)
