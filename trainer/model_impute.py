"""Model-based imputation (``impute.numeric: model``) as plain fitted numbers.

scikit-learn's ``IterativeImputer`` (with its default ``BayesianRidge``) is fitted on the
training rows; what it learned is then copied out into arrays: the initial column means, and
for each step of each round the column it fills, the columns it reads, a linear model's
coefficients and intercept, and the clip bounds. ``ChainImputer.transform`` replays exactly
those steps with numpy, so the same code fills training, validation and prediction rows, and
the fitted imputer saves as numbers (no pickle) and loads without scikit-learn.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

MODEL_MAX_ROWS = 50_000
MODEL_SEED = 0


@dataclass
class ChainImputer:
    """A fitted round-robin linear imputer; every attribute is an array or a number.

    ``statistics`` (F,) initial fill (training means); per step s: ``feature[s]`` the column
    filled, ``neighbors[s]`` (K_s,) the columns read, ``coef[s]`` (K_s,), ``intercept[s]``;
    ``lower`` / ``upper`` (F,) clip bounds.
    """

    statistics: np.ndarray
    feature: np.ndarray
    neighbors: list[np.ndarray]
    coef: list[np.ndarray]
    intercept: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(N, F) float64 with NaNs -> (N, F) filled; observed values are kept as they are."""
        missing = np.isnan(x)  # (N, F)
        filled = np.where(missing, self.statistics, x)
        if missing.all():  # as IterativeImputer: nothing observed to regress on
            return filled
        for s, col in enumerate(self.feature):
            rows = missing[:, col]
            if not rows.any():
                continue
            pred = filled[np.ix_(rows, self.neighbors[s])] @ self.coef[s] + self.intercept[s]
            filled[rows, col] = np.clip(pred, self.lower[col], self.upper[col])
        return filled

    # --- saved as numbers --------------------------------------------------------------
    def to_state(self, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"{prefix}statistics": self.statistics, f"{prefix}feature": self.feature,
                  f"{prefix}intercept": self.intercept, f"{prefix}lower": self.lower,
                  f"{prefix}upper": self.upper}
        for s, (nb, cf) in enumerate(zip(self.neighbors, self.coef, strict=True)):
            arrays[f"{prefix}neighbors_{s}"] = nb
            arrays[f"{prefix}coef_{s}"] = cf
        return {"steps": len(self.feature)}, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: Any, prefix: str) -> ChainImputer:
        steps = int(meta["steps"])
        out = cls(statistics=_floats(arrays[f"{prefix}statistics"]),
                  feature=np.asarray(arrays[f"{prefix}feature"], dtype=np.int64),
                  neighbors=[np.asarray(arrays[f"{prefix}neighbors_{s}"], dtype=np.int64)
                             for s in range(steps)],
                  coef=[_floats(arrays[f"{prefix}coef_{s}"]) for s in range(steps)],
                  intercept=_floats(arrays[f"{prefix}intercept"]),
                  lower=_floats(arrays[f"{prefix}lower"]),
                  upper=_floats(arrays[f"{prefix}upper"]))
        out._check()
        return out

    def _check(self) -> None:
        """A loaded imputer must index its own columns only (a tampered file is an error)."""
        n = len(self.statistics)
        ok = len(self.lower) == len(self.upper) == n and len(self.intercept) == len(
            self.feature) and all(len(c) == len(nb) for c, nb in zip(
                self.coef, self.neighbors, strict=True))
        idx = [self.feature, *self.neighbors]
        if not ok or any(len(i) and (i.min() < 0 or i.max() >= n) for i in idx):
            raise ValueError("preprocessor: the model imputer's arrays do not fit together")


def _floats(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def fit_chain(x: np.ndarray) -> ChainImputer:
    """Fit ``IterativeImputer`` on at most MODEL_MAX_ROWS rows (fixed seed) and copy it out."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer
    from sklearn.linear_model import BayesianRidge

    if len(x) > MODEL_MAX_ROWS:
        rows = np.random.default_rng(MODEL_SEED).choice(len(x), MODEL_MAX_ROWS, replace=False)
        x = x[np.sort(rows)]
    model = IterativeImputer(estimator=BayesianRidge(), random_state=MODEL_SEED,
                             keep_empty_features=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x)
    seq = model.imputation_sequence_
    n = x.shape[1]
    return ChainImputer(
        statistics=np.asarray(model.initial_imputer_.statistics_, dtype=np.float64),
        feature=np.asarray([t.feat_idx for t in seq], dtype=np.int64),
        neighbors=[np.asarray(t.neighbor_feat_idx, dtype=np.int64) for t in seq],
        coef=[np.asarray(t.estimator.coef_, dtype=np.float64) for t in seq],
        intercept=np.asarray([float(t.estimator.intercept_) for t in seq], dtype=np.float64),
        lower=_bound(model, "_min_value", -np.inf, n),
        upper=_bound(model, "_max_value", np.inf, n))


def _bound(model: Any, name: str, default: float, n: int) -> np.ndarray:
    """IterativeImputer's clip bounds; it sets none when it only imputed the initial statistics
    (one column, or nothing to model), and then nothing is clipped."""
    value = getattr(model, name, default)
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()
