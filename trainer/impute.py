"""Leak-free imputation of a tabular frame, fitted on the training split only.

The imputer follows the scikit-learn contract (``fit`` stores statistics, ``transform`` applies
them) so that the very same fitted object can travel inside the registered model and fill raw
prediction rows exactly as it filled the training rows. Everything is vectorised per column:
``fillna`` with a dict, ``value_counts`` for modes, ``isna`` masks for indicators.
"""

from __future__ import annotations

import warnings
from numbers import Real
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from trainer.config import CATEGORICAL_STRATEGIES, NUMERIC_STRATEGIES
from trainer.errors import RungwiseError
from trainer.model_impute import ChainImputer, fit_chain

MISSING = "__missing__"
INDICATOR_SUFFIX = "__missing"
_ALTERNATIVES = {  # the strategies that fill, for a row that cannot be dropped
    "numeric": "/".join(s for s in NUMERIC_STRATEGIES if s != "drop_rows"),
    "categorical": "/".join(s for s in CATEGORICAL_STRATEGIES if s != "drop_rows"),
}


class MissingAtPredictionError(RungwiseError):
    """Rows reached ``transform`` with missing values in a ``drop_rows`` column.

    ``drop_rows`` can only discard training rows; at prediction time a row cannot be dropped
    silently, so the caller must either remove it (``Imputer.droppable_rows``) or pick a strategy
    that fills.
    """


class Imputer(BaseEstimator):
    """Fill missing values with statistics learned from the training rows only.

    Parameters (stored as given; checked in ``fit`` so that a bad spec fails with its key path,
    against the choices of the spec's ``impute`` section, ``trainer.config.ImputeSpec``):
    ``numeric`` in ``NUMERIC_STRATEGIES``; ``categorical`` in ``CATEGORICAL_STRATEGIES``;
    ``drop_columns_above`` a fraction in (0, 1] or None;
    ``indicator`` adds float32 ``<col>__missing`` flags; ``fill_value`` for ``constant``
    (numeric default 0, categorical default ``"__missing__"``, else ``str(fill_value)``).

    Column kind comes from the dtype: numeric (bools included) or categorical (everything else,
    cast to the pandas ``str`` dtype). Numeric outputs are float64, or float32 if the input was.

    Fitted attributes: ``feature_names_in_``, ``n_features_in_``, ``column_kinds_``,
    ``missing_fraction_`` (over all rows given to ``fit``), ``dropped_columns_``,
    ``numeric_columns_`` / ``categorical_columns_`` (kept, input order), ``drop_rows_columns_``,
    ``statistics_`` (column -> fill value; for ``model`` the IterativeImputer's initial mean),
    ``indicator_columns_``, ``dtypes_``, ``model_`` (a ``ChainImputer`` copied out of a fitted
    IterativeImputer, or None) and ``feature_names_out_``. With ``drop_rows`` the statistics of
    the other columns come from the rows that survive, i.e. exactly the rows ``fit_transform``
    returns for training.

    ``plan()`` (fitted) and ``describe_plan(df_train)`` (fits a copy) return one dict per input
    column with ``column``, ``kind``, ``missing_fraction``, ``action``, ``fill`` and ``indicator``,
    which is what ``rungwise inspect`` prints.
    """

    def __init__(
        self,
        numeric: str = "median",
        categorical: str = "category",
        drop_columns_above: float | None = None,
        indicator: bool = False,
        fill_value: Any = None,
    ) -> None:
        self.numeric = numeric
        self.categorical = categorical
        self.drop_columns_above = drop_columns_above
        self.indicator = indicator
        self.fill_value = fill_value

    # ------------------------------------------------------------------ fit
    def fit(self, df: pd.DataFrame, y: Any = None) -> Imputer:
        """Learn which columns to keep and their fill values from ``df`` (training rows only)."""
        self._validate_params()
        _check_frame(df, "fit")
        if len(df) == 0:
            raise ValueError("Imputer.fit: got a frame with 0 rows, expected at least one row")
        self.feature_names_in_ = list(df.columns)
        self.n_features_in_ = len(self.feature_names_in_)
        self.column_kinds_ = {c: _kind(df[c]) for c in df.columns}
        self.missing_fraction_ = {c: float(v) for c, v in df.isna().mean().items()}
        self.dropped_columns_ = self._columns_to_drop()
        kept = [c for c in df.columns if c not in set(self.dropped_columns_)]
        self.numeric_columns_ = [c for c in kept if self.column_kinds_[c] == "numeric"]
        self.categorical_columns_ = [c for c in kept if self.column_kinds_[c] == "categorical"]
        self.drop_rows_columns_ = (self.numeric_columns_ if self.numeric == "drop_rows" else []) + (
            self.categorical_columns_ if self.categorical == "drop_rows" else []
        )
        self.dtypes_ = {c: _target_dtype(df[c], self.column_kinds_[c]) for c in kept}
        train = df[kept]
        if self.drop_rows_columns_:
            train = train[~self.droppable_mask(df)]
        train = _cast(train, self.dtypes_)
        self.statistics_, self.model_ = self._fit_statistics(train)
        filled = [c for c in kept if c not in set(self.drop_rows_columns_)]
        self.indicator_columns_ = self._indicators(filled)
        self.feature_names_out_ = kept + self.indicator_columns_
        return self

    def _validate_params(self) -> None:
        """Fail early with the spec key path, the value received and what is allowed."""
        _check_choice("impute.numeric", self.numeric, NUMERIC_STRATEGIES)
        _check_choice("impute.categorical", self.categorical, CATEGORICAL_STRATEGIES)
        thr = self.drop_columns_above
        if thr is not None and not (_is_number(thr) and 0 < thr <= 1):
            raise RungwiseError(
                f"impute.drop_columns_above: got {thr!r}, allowed: a fraction in (0, 1] or null"
            )
        if not isinstance(self.indicator, bool | np.bool_):
            raise RungwiseError(f"impute.indicator: got {self.indicator!r}, allowed: true, false")
        fv = self.fill_value
        if self.numeric == "constant" and fv is not None and not _is_number(fv):
            raise RungwiseError(
                f"impute.fill_value: got {fv!r}, allowed: a number when impute.numeric=constant"
            )

    def _columns_to_drop(self) -> list[str]:
        """Columns never observed (always dropped, with a warning) or missing above the limit."""
        frac = self.missing_fraction_
        empty = [c for c, f in frac.items() if f >= 1.0]
        if empty:
            warnings.warn(
                f"impute: dropping column(s) with no observed value in training: "
                f"{', '.join(map(str, empty))}",
                UserWarning,
                stacklevel=3,
            )
        thr = self.drop_columns_above
        return [c for c, f in frac.items() if f >= 1.0 or (thr is not None and f > thr)]

    def _fit_statistics(self, train: pd.DataFrame) -> tuple[dict[str, Any], Any]:
        """Fill values per column and, for ``model``, the fitted IterativeImputer."""
        stats: dict[str, Any] = {}
        model = None
        num, cat = self.numeric_columns_, self.categorical_columns_
        if self.numeric == "model" and num:
            model = _fit_model(train[num])
            stats.update(zip(num, map(float, model.statistics), strict=True))
        elif self.numeric != "drop_rows":
            number = 0.0 if self.fill_value is None else float(self.fill_value)
            stats.update(_statistics(train, num, self.numeric, number))
        if self.categorical != "drop_rows":
            own = self.fill_value is None or self.categorical == "category"
            text = MISSING if own else str(self.fill_value)
            strategy = "constant" if self.categorical == "category" else self.categorical
            stats.update(_statistics(train, cat, strategy, text))
        return stats, model

    def _indicators(self, columns: list[str]) -> list[str]:
        """Indicator names for filled columns that had missing values in training."""
        if not self.indicator:
            return []
        names = [f"{c}{INDICATOR_SUFFIX}" for c in columns if self.missing_fraction_[c] > 0]
        clash = sorted(set(names) & set(map(str, self.feature_names_in_)))
        if clash:
            raise ValueError(f"impute.indicator: column names already exist: {', '.join(clash)}")
        return names

    # ------------------------------------------------------------ transform
    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Fill ``df`` with the training statistics; same index, kept columns NaN-free."""
        self._check_fitted()
        self._check_columns(df)
        bad = self.droppable_mask(df)
        if bad.any():
            raise MissingAtPredictionError(self._missing_message(df, bad))
        return self._fill(df)

    def fit_transform(self, df: pd.DataFrame, y: Any = None) -> pd.DataFrame:
        """Fit, then return the training frame without the rows ``drop_rows`` rejects.

        The index is preserved so that the caller can align ``y`` with ``.loc``.
        """
        self.fit(df)
        bad = self.droppable_mask(df)
        return self._fill(df[~bad] if bad.any() else df)

    def droppable_mask(self, df: pd.DataFrame) -> np.ndarray:
        """Boolean array, True for rows with a missing value in a ``drop_rows`` column."""
        cols = getattr(self, "drop_rows_columns_", None)
        if cols is None:
            raise NotFittedError("Imputer is not fitted yet; call fit(df_train) first")
        if not cols:
            return np.zeros(len(df), dtype=bool)
        return df[cols].isna().to_numpy().any(axis=1)

    def droppable_rows(self, df: pd.DataFrame) -> pd.Index:
        """Labels of the rows that ``drop_rows`` would reject (drop them from val/test splits)."""
        return df.index[self.droppable_mask(df)]

    def _fill(self, df: pd.DataFrame) -> pd.DataFrame:
        out = _cast(df[self._kept()], self.dtypes_)
        flags = None
        if self.indicator_columns_:
            src = [c[: -len(INDICATOR_SUFFIX)] for c in self.indicator_columns_]
            flags = out[src].isna().to_numpy(dtype=np.float32)
        if self.model_ is not None:
            out = _apply_model(self.model_, out, self.numeric_columns_)
        skip = set(self.numeric_columns_) if self.model_ is not None else set()
        fill = {c: v for c, v in self.statistics_.items() if c not in skip}
        if fill:
            out = out.fillna(value=fill)
        if flags is not None:
            ind = pd.DataFrame(flags, index=out.index, columns=self.indicator_columns_)
            out = pd.concat([out, ind], axis=1)
        return out

    def _check_fitted(self) -> None:
        if not hasattr(self, "feature_names_out_"):
            raise NotFittedError("Imputer is not fitted yet; call fit(df_train) first")

    def _check_columns(self, df: pd.DataFrame) -> None:
        """Extra columns are ignored; kept training columns must be present."""
        _check_frame(df, "transform")
        have = set(df.columns)
        missing = ", ".join(str(c) for c in self._kept() if c not in have)
        if missing:
            raise ValueError(f"Imputer.transform: columns seen in fit are missing: {missing}")

    def _kept(self) -> list[str]:
        """Input columns that survive into the output, in input order."""
        return [c for c in self.feature_names_out_ if c in self.dtypes_]

    def _missing_message(self, df: pd.DataFrame, bad: np.ndarray) -> str:
        """One line naming up to 5 offending row labels, the columns and the strategy keys."""
        rows = df.index[bad]
        na = df.loc[bad, self.drop_rows_columns_].isna().any(axis=0)
        cols = ", ".join(str(c) for c in na.index[na.to_numpy()])
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        noun = "1 row has" if len(rows) == 1 else f"{len(rows)} rows have"
        kinds = {self.column_kinds_[c] for c in na.index[na.to_numpy()]}
        keys = [k for k in ("numeric", "categorical") if k in kinds]
        advice = "; ".join(
            f"impute.{k}=drop_rows cannot handle missing values at prediction time; "
            f"choose {_ALTERNATIVES[k]}" for k in keys
        )
        return f"{noun} missing values in drop_rows columns ({cols}): rows {shown}; {advice}"

    # ----------------------------------------------------------------- plan
    def plan(self) -> list[dict[str, Any]]:
        """Per input column: kind, missing fraction, the action taken, fill value, indicator."""
        self._check_fitted()
        return [self._plan_row(c) for c in self.feature_names_in_]

    def describe_plan(self, df_train: pd.DataFrame) -> list[dict[str, Any]]:
        """Plan for ``df_train`` with these parameters, without fitting ``self``."""
        return Imputer(**self.get_params()).fit(df_train).plan()

    def _plan_row(self, col: str) -> dict[str, Any]:
        frac = self.missing_fraction_[col]
        fill = self.statistics_.get(col)
        strategy = self.numeric if self.column_kinds_[col] == "numeric" else self.categorical
        if col in set(self.dropped_columns_):
            why = "no observed value" if frac >= 1.0 else (
                f"missing {frac:.0%} > {self.drop_columns_above:.0%}")
            action, fill = f"drop column ({why})", None
        elif frac == 0:
            action = "keep (no missing)"
        elif strategy == "drop_rows":
            action = "drop rows"
        elif strategy == "category":
            action = f"own category {MISSING}"
        elif strategy == "model":
            action = "fill model (IterativeImputer)"
        else:
            action = f"fill {strategy}={fill!r}"
        return {
            "column": col,
            "kind": self.column_kinds_[col],
            "missing_fraction": frac,
            "action": action,
            "fill": fill,
            "indicator": f"{col}{INDICATOR_SUFFIX}" in set(self.indicator_columns_),
        }


# ---------------------------------------------------------------- helpers
def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise RungwiseError(f"{key}: got {value!r}, allowed: {', '.join(allowed)}")


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool | np.bool_)


def _check_frame(df: Any, where: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"Imputer.{where}: expected a pandas DataFrame, got {type(df).__name__}")


def _kind(s: pd.Series) -> str:
    return "numeric" if pd.api.types.is_numeric_dtype(s.dtype) else "categorical"


def _target_dtype(s: pd.Series, kind: str) -> Any:
    """float32/float64 stay; other numerics become float64; categoricals become ``str``."""
    if kind == "numeric":
        if isinstance(s.dtype, np.dtype) and s.dtype.kind == "f":
            return s.dtype
        return np.dtype("float64")
    return s.dtype if isinstance(s.dtype, pd.StringDtype) else pd.StringDtype(na_value=np.nan)


def _cast(df: pd.DataFrame, dtypes: dict[str, Any]) -> pd.DataFrame:
    """Cast only the columns whose dtype differs, so the common case copies nothing."""
    todo = {c: dtypes[c] for c in df.columns if df[c].dtype != dtypes[c]}
    return df.astype(todo) if todo else df


def _statistics(train: pd.DataFrame, cols: list[str], strategy: str, default: Any) -> dict:
    """Column -> fill value; matches SimpleImputer (mean, median, most_frequent)."""
    if strategy == "constant":
        return dict.fromkeys(cols, default)
    if strategy == "mode":
        return {c: _mode(train[c]) for c in cols}
    method = {"mean": pd.Series.mean, "median": pd.Series.median}[strategy]
    return {c: float(method(train[c])) for c in cols}


def _mode(s: pd.Series) -> Any:
    """Most frequent observed value; ties go to the smallest, as in SimpleImputer."""
    counts = s.value_counts(dropna=True)
    if counts.empty:
        return MISSING if not pd.api.types.is_numeric_dtype(s.dtype) else 0.0
    top = counts.index[counts.to_numpy() == counts.iloc[0]].min()
    return float(top) if pd.api.types.is_numeric_dtype(s.dtype) else str(top)


def _fit_model(num: pd.DataFrame) -> ChainImputer:
    """The model imputer, fitted on the training rows (see ``trainer.model_impute``)."""
    return fit_chain(num.to_numpy(dtype=np.float64, na_value=np.nan, copy=True))


def _apply_model(model: ChainImputer, out: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Run the model imputer only on rows that need it (most rows are usually complete)."""
    x = out[cols].to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    rows = np.isnan(x).any(axis=1)
    if not rows.any():
        return out
    x[rows] = model.transform(x[rows])
    out = out.copy(deep=False)
    for j, c in enumerate(cols):
        out[c] = x[:, j].astype(out[c].dtype, copy=False)
    return out
