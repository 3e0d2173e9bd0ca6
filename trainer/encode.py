"""Turn an imputed frame and its target into float32 / int64 arrays for the network.

``TabularEncoder`` standardises numerics and one-hot encodes categoricals with statistics from
the training rows; ``TargetEncoder`` maps labels to class indices (or standardises a regression
target); ``Preprocessor`` chains imputer -> encoder -> target encoder so that one picklable object
turns raw rows, missing values included, into model inputs at training and at prediction time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from trainer import profile
from trainer.config import TASKS
from trainer.impute import Imputer


def _require(obj: object, attr: str) -> None:
    if not hasattr(obj, attr):
        raise NotFittedError(f"{type(obj).__name__} is not fitted yet; call fit first")


def _missing_columns(df: pd.DataFrame, cols: list[str], who: str) -> None:
    have = set(df.columns)
    missing = [c for c in cols if c not in have]
    if missing:
        raise ValueError(f"{who}: columns seen in fit are missing: {', '.join(map(str, missing))}")


class TabularEncoder(BaseEstimator):
    """Standardise numeric columns and one-hot encode the others into one float32 matrix.

    Numerics use the training mean and population std (std 0 -> 1, so constant columns become
    0 rather than NaN). Categoricals get one column per category seen in training, sorted; a
    category unseen in training (or a missing value) yields an all-zero block instead of an
    error, because prediction rows must never crash the served model. Output columns follow the
    input column order; ``feature_names_out_`` names them (``col`` or ``col=category``).
    """

    def fit(self, df: pd.DataFrame, y: Any = None) -> TabularEncoder:
        """Learn means, scales and category lists from the (imputed) training frame."""
        self.feature_names_in_ = list(df.columns)
        self.numeric_columns_ = [
            c for c in df.columns if pd.api.types.is_numeric_dtype(df[c].dtype)
        ]
        self.categorical_columns_ = [c for c in df.columns if c not in set(self.numeric_columns_)]
        x = df[self.numeric_columns_].to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isnan(x).any():
            raise ValueError("TabularEncoder.fit: numeric input has NaN; impute before encoding")
        self.mean_ = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        std = x.std(axis=0) if len(x) else np.ones(x.shape[1])
        self.scale_ = np.where(std > 0, std, 1.0)
        self.categories_ = {
            c: sorted(map(str, _as_str(df[c]).dropna().unique())) for c in self.categorical_columns_
        }
        self._layout()
        return self

    def _layout(self) -> None:
        """Output positions: one slot per numeric column, one block per categorical column."""
        names: list[str] = []
        self.numeric_positions_ = np.zeros(len(self.numeric_columns_), dtype=np.int64)
        self.block_offsets_: dict[str, int] = {}
        num_index = {c: i for i, c in enumerate(self.numeric_columns_)}
        for col in self.feature_names_in_:
            if col in num_index:
                self.numeric_positions_[num_index[col]] = len(names)
                names.append(str(col))
            else:
                self.block_offsets_[col] = len(names)
                names.extend(f"{col}={cat}" for cat in self.categories_[col])
        self.feature_names_out_ = names

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """(N, F) float32 matrix; extra columns are ignored, unseen categories encode as zeros."""
        _require(self, "feature_names_out_")
        _missing_columns(df, self.feature_names_in_, "TabularEncoder.transform")
        n = len(df)
        out = np.zeros((n, len(self.feature_names_out_)), dtype=np.float32)  # (N, F)
        if self.numeric_columns_:
            x = df[self.numeric_columns_].to_numpy(dtype=np.float64, na_value=np.nan)
            if np.isnan(x).any():
                raise ValueError(
                    "TabularEncoder.transform: numeric input has NaN; impute before encoding"
                )
            out[:, self.numeric_positions_] = (x - self.mean_) / self.scale_
        rows = np.arange(n)
        for col, offset in self.block_offsets_.items():
            codes = pd.Index(self.categories_[col], dtype="str").get_indexer(_as_str(df[col]))
            seen = codes >= 0
            out[rows[seen], offset + codes[seen]] = 1.0
        return out


def _as_str(s: pd.Series) -> pd.Series:
    return s if isinstance(s.dtype, pd.StringDtype) else s.astype("str")


class TargetEncoder(BaseEstimator):
    """Encode the target: class indices for classification, a standardised float for regression.

    Classification keeps the original labels in ``classes_`` (sorted) so that predictions decode
    back to what the user wrote in the data; regression standardises with ``mean_`` / ``scale_``
    so that one learning rate works across targets of any magnitude.
    """

    def fit(self, y: pd.Series, task: str) -> TargetEncoder:
        """Learn the label set (classification) or the mean and scale (regression)."""
        if task not in TASKS:
            raise ValueError(f"data.task: got {task!r}, allowed: {', '.join(TASKS)}")
        y = _series(y)
        if y.isna().any():
            raise ValueError(f"target: {int(y.isna().sum())} missing values; drop them first")
        self.task_: str = task
        if task == "classification":
            self.classes_ = pd.Index(y.unique()).sort_values().to_numpy()
            self.output_dim_ = len(self.classes_)
        else:
            values = y.to_numpy(dtype=np.float64)
            self.mean_ = float(values.mean())
            std = float(values.std())
            self.scale_ = std if std > 0 else 1.0
            self.output_dim_ = 1
        return self

    def transform(self, y: Any) -> np.ndarray:
        """int64 class indices (unknown label -> ValueError) or standardised float32 values."""
        _require(self, "task_")
        y = _series(y)
        if self.task_ == "regression":
            return ((y.to_numpy(dtype=np.float64) - self.mean_) / self.scale_).astype(np.float32)
        codes = pd.Index(self.classes_).get_indexer(y)
        if (codes < 0).any():
            unknown = pd.unique(y[codes < 0].to_numpy())[:5]
            raise ValueError(
                f"target: label(s) not seen in training: {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(map(repr, self.classes_))}"
            )
        return codes.astype(np.int64)

    def inverse_transform(self, arr: Any) -> np.ndarray:
        """Labels from class indices, or values in the target's own units."""
        _require(self, "task_")
        arr = np.asarray(arr)
        if self.task_ == "regression":
            return arr.astype(np.float64) * self.scale_ + self.mean_
        return self.classes_[arr.astype(np.int64)]


def _series(y: Any) -> pd.Series:
    return y if isinstance(y, pd.Series) else pd.Series(np.asarray(y))


class Preprocessor(BaseEstimator):
    """Imputer + TabularEncoder + TargetEncoder, fitted together on the training split.

    This is the object that travels inside the registered model: ``transform`` takes raw rows
    (missing values included) and returns model inputs. ``imputer`` is fitted in place.
    ``fit`` drops the training rows that ``drop_rows`` rejects and aligns ``y`` by position.
    """

    def __init__(self, imputer: Imputer, task: str) -> None:
        self.imputer = imputer
        self.task = task

    def fit(self, X_df: pd.DataFrame, y: Any) -> Preprocessor:
        """Fit imputer, encoder and target encoder on the training split."""
        self._fit(X_df, y)
        return self

    def fit_transform(self, X_df: pd.DataFrame, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Fit on the training split; return (X float32 (N, F), y encoded (N,))."""
        return self._fit(X_df, y)

    def _fit(self, X_df: pd.DataFrame, y: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.task not in TASKS:
            raise ValueError(f"data.task: got {self.task!r}, allowed: {', '.join(TASKS)}")
        y = _aligned(X_df, y)
        imputed = self.imputer.fit_transform(X_df)
        self.profile_ = profile.build(X_df, y, self.imputer.column_kinds_,  # drift reference
                                      self.imputer.dropped_columns_, self.task, y.name)
        keep = ~self.imputer.droppable_mask(X_df)
        y = y[keep]
        self.encoder_ = TabularEncoder().fit(imputed)
        self.target_encoder_ = TargetEncoder().fit(y, self.task)
        self.feature_names_out_ = self.encoder_.feature_names_out_
        return self.encoder_.transform(imputed), self.target_encoder_.transform(y)

    def transform(
        self, X_df: pd.DataFrame, y: Any = None, drop_missing: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None, pd.Index]:
        """Encode val/test/prediction rows; returns (X, y encoded or None, kept row labels).

        ``drop_missing=True`` first removes the rows the imputer's ``drop_rows`` cannot fill
        (for evaluation splits); otherwise such rows raise ``MissingAtPredictionError``.
        """
        _require(self, "encoder_")
        if y is not None:
            y = _aligned(X_df, y)
        if drop_missing:
            keep = ~self.imputer.droppable_mask(X_df)
            if not keep.all():
                X_df = X_df[keep]
                y = None if y is None else y[keep]
        imputed = self.imputer.transform(X_df)
        y_out = None if y is None else self.target_encoder_.transform(y)
        return self.encoder_.transform(imputed), y_out, imputed.index

    def inverse_transform_target(self, arr: Any) -> np.ndarray:
        """Decode network outputs (class indices or standardised values) to user units."""
        _require(self, "target_encoder_")
        return self.target_encoder_.inverse_transform(arr)


def _aligned(X_df: pd.DataFrame, y: Any) -> pd.Series:
    """``y`` as a Series row-aligned with ``X_df``; a Series must carry the same index.

    Alignment is then by position, which stays correct with duplicate index labels.
    """
    if isinstance(y, pd.Series) and not y.index.equals(X_df.index):
        raise ValueError("y must have the same index as X (same labels, same order)")
    y = _series(y)
    if len(y) != len(X_df):
        raise ValueError(f"y has {len(y)} rows but X has {len(X_df)}; they must align")
    return y
