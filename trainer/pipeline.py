"""From the spec's data + impute sections (trainer/config.py) to arrays a network trains on.

read -> schema -> split (seeded) -> imputer + encoder fitted on the training split only ->
float32 arrays. The types in that flow:

    split_data(DataSpec) -> SplitData            trainer.data: the three splits, unfitted
    prepare(SplitData, ImputeSpec) -> Prepared   arrays + fitted preprocessor, in the driver
    Prepared.arrays() -> ArrayData               trainer.arrays: what a sweep sends its trials
    TensorData.from_prepared(ArrayData)          trainer.loop: torch tensors, in the trial

``split_data`` and ``prepare`` are separate so a sweep reads and splits once and prepares
once per distinct imputation choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from trainer.arrays import ArrayData
from trainer.config import DataSpec, ImputeSpec
from trainer.data import (
    DataError,
    Images,
    Schema,
    SplitData,
    detect_format,
    fingerprint,
    infer_schema,
    read_images,
    read_table,
    select,
    split,
)
from trainer.encode import Preprocessor
from trainer.impute import Imputer


@dataclass(kw_only=True)
class Prepared(ArrayData):
    """Arrays + the fitted preprocessor: made by ``prepare``, kept in the driver for the model."""

    preprocessor: Any
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)
    example: pd.DataFrame | None = None
    """A few raw validation rows (missing values first): the model's input example."""

    def arrays(self) -> ArrayData:
        """The arrays alone (no preprocessor): what a sweep's trials are sent."""
        return ArrayData(**{f.name: getattr(self, f.name) for f in fields(ArrayData)})


def split_data(data: DataSpec) -> SplitData:
    """``DataSpec -> SplitData``: read and split the data named by the spec's ``data`` section."""
    if detect_format(str(data.path), data.format) == "npz":
        return _split_images(data)
    df = read_table(data)
    schema = infer_schema(df, data)
    frame = select(df, schema)
    train, val, test = split(frame, schema, data.split)
    return SplitData(train=train, val=val, test=test, schema=schema,
                     fingerprint=fingerprint(frame), task=data.task)


def _split_images(data: DataSpec) -> SplitData:
    if data.task != "classification":
        raise DataError("data.task: image data (.npz) supports classification only")
    images = read_images(data)
    y = pd.Series(images.y)
    if y.nunique() < 2:
        raise DataError("data.path: y holds a single class; classification needs two")
    idx = pd.DataFrame({"y": y})
    schema = Schema(target="y", task="classification", numeric=[], categorical=[])
    rows = [part.index.to_numpy() for part in split(idx, schema, data.split)]
    train, val, test = (Images(x=images.x[r], y=images.y[r]) for r in rows)
    fp = fingerprint(pd.DataFrame({"x": images.x.reshape(len(images.x), -1).sum(1),
                                   "y": images.y}))
    return SplitData(train=train, val=val, test=test, schema=None, fingerprint=fp,
                     task=data.task)


def make_imputer(impute: ImputeSpec) -> Imputer:
    return Imputer(numeric=impute.numeric, categorical=impute.categorical,
                   drop_columns_above=impute.drop_columns_above,
                   indicator=impute.indicator, fill_value=impute.fill_value)


def prepare(data: SplitData, impute: ImputeSpec) -> Prepared:
    """``SplitData, ImputeSpec -> Prepared``: fit the preprocessing on the training split only,
    then transform all three."""
    tr, va, te = data.train, data.val, data.test
    if isinstance(tr, Images):
        return _prepare_images(data)
    assert isinstance(va, pd.DataFrame) and isinstance(te, pd.DataFrame)
    assert data.schema is not None
    target = data.schema.target
    pre = Preprocessor(make_imputer(impute), task=data.task)
    x_tr, y_tr = pre.fit_transform(tr.drop(columns=[target]), tr[target])
    if len(x_tr) == 0:
        raise DataError("impute: no training rows left after drop_rows; "
                        "choose another impute strategy")
    x_va, y_va, kept_va = pre.transform(va.drop(columns=[target]), va[target], drop_missing=True)
    x_te, y_te, kept_te = pre.transform(te.drop(columns=[target]), te[target], drop_missing=True)
    if len(x_va) == 0 or len(x_te) == 0:
        raise DataError("impute: drop_rows left an empty validation or test split")
    assert y_va is not None and y_te is not None  # the frames hold the target
    tgt = pre.target_encoder_
    n_classes = len(tgt.classes_) if data.task == "classification" else 0
    info = {"rows_train": len(x_tr), "rows_val": len(x_va), "rows_test": len(x_te),
            "rows_dropped_train": len(tr) - len(x_tr),
            "rows_dropped_eval": (len(va) - len(kept_va)) + (len(te) - len(kept_te)),
            "n_features": int(x_tr.shape[1])}
    return Prepared(x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va, x_test=x_te, y_test=y_te,
                    task=data.task, n_classes=n_classes, preprocessor=pre,
                    fingerprint=data.fingerprint,
                    y_mean=float(getattr(tgt, "mean_", 0.0) or 0.0),
                    y_scale=float(getattr(tgt, "scale_", 1.0) or 1.0), info=info,
                    example=example_rows(va.drop(columns=[target]), pre))


def example_rows(frame: pd.DataFrame, pre: Any, n: int = 5) -> pd.DataFrame:
    """Rows with missing values first, so the logged example shows that they are handled."""
    keep = ~pre.imputer.droppable_mask(frame)
    frame = frame[keep]
    has_na = frame.isna().any(axis=1).to_numpy()
    return pd.concat([frame[has_na].head(n), frame[~has_na].head(n)]).head(n).reset_index(
        drop=True)


class ImagePreprocessor:
    """Pixel scaling fitted on the training images; labels to class indices."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> ImagePreprocessor:
        self.mean_ = float(x.mean())
        self.std_ = float(x.std()) or 1.0
        self.classes_ = np.unique(y)
        self.input_shape_ = tuple(x.shape[1:])
        return self

    def transform_x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == len(self.input_shape_):
            x = x[:, None]
        if x.ndim == 2:
            x = x.reshape((len(x), *self.input_shape_))
        return ((x - self.mean_) / self.std_).astype(np.float32)

    def transform_y(self, y: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.classes_, y)
        idx = np.clip(idx, 0, len(self.classes_) - 1)
        if not (self.classes_[idx] == y).all():
            raise DataError("data: test labels not seen in training")
        return idx.astype(np.int64)

    def decode_y(self, idx: np.ndarray) -> np.ndarray:
        return self.classes_[np.asarray(idx)]


def _prepare_images(data: SplitData) -> Prepared:
    tr, va, te = data.train, data.val, data.test
    assert isinstance(tr, Images) and isinstance(va, Images) and isinstance(te, Images)
    pre = ImagePreprocessor().fit(tr.x, tr.y)
    return Prepared(
        x_train=pre.transform_x(tr.x), y_train=pre.transform_y(tr.y),
        x_val=pre.transform_x(va.x), y_val=pre.transform_y(va.y),
        x_test=pre.transform_x(te.x), y_test=pre.transform_y(te.y),
        task="classification", n_classes=len(pre.classes_), preprocessor=pre,
        fingerprint=data.fingerprint,
        info={"rows_train": len(tr.x), "rows_val": len(va.x), "rows_test": len(te.x),
              "input_shape": list(tr.x.shape[1:])})


def load_and_prepare(data: DataSpec, impute: ImputeSpec) -> Prepared:
    return prepare(split_data(data), impute)
