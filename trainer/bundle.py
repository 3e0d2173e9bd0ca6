"""A trained network with its fitted preprocessing: predicts on raw rows with missing values.

This is what the registry holds. Saved as data only, no pickle anywhere: the network's weights
(``weights.pt``, loaded with ``torch.load(weights_only=True)``), the fitted imputer + encoder as
numbers and names (``preprocessor.json`` + ``preprocessor.npz``, see
``trainer.preprocessor_state``) and ``bundle.json`` (the model section of the spec, shapes,
task). A tampered artifact can make a wrong model, never run code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from trainer import preprocessor_state, profile
from trainer.config import ModelSpec
from trainer.loop import predict, predict_proba
from trainer.models import build_model


@dataclass
class ModelBundle:
    preprocessor: Any
    model_spec: dict[str, Any]
    input_shape: tuple[int, ...]
    n_outputs: int
    task: str
    state_dict: dict[str, torch.Tensor]
    feature_columns: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._net: torch.nn.Module | None = None

    @property
    def network(self) -> torch.nn.Module:
        if self._net is None:
            net = build_model(ModelSpec.model_validate(self.model_spec), tuple(self.input_shape),
                              self.n_outputs, seed=0)
            net.load_state_dict(self.state_dict)
            self._net = net.eval()
        return self._net

    def encode(self, rows: Any) -> np.ndarray:
        """Raw rows (a DataFrame, or an image array) -> the network's float32 input."""
        if hasattr(self.preprocessor, "transform_x"):  # images
            return self.preprocessor.transform_x(_image_array(rows))
        frame = pd.DataFrame(rows)
        missing = [c for c in self.feature_columns if c not in frame.columns]
        if missing:
            raise ValueError(f"input: missing columns {', '.join(missing)}; "
                             f"the model needs {', '.join(self.feature_columns)}")
        frame = _as_training_kinds(frame[self.feature_columns], self.preprocessor)
        x, _, _ = self.preprocessor.transform(frame)
        return x

    def predict(self, rows: Any) -> np.ndarray:
        """Labels (classification) or values in original units (regression)."""
        x = self.encode(rows)
        if self.task == "classification":
            idx = predict(self.network, x)
            return self._decode(idx)
        pre = self.preprocessor.target_encoder_
        return predict(self.network, x, y_mean=float(pre.mean_), y_scale=float(pre.scale_))

    def predict_proba(self, rows: Any) -> np.ndarray:
        return predict_proba(self.network, self.encode(rows))

    def evaluate(self, rows: pd.DataFrame, y: Any, prefix: str = "test_") -> dict[str, float]:
        """Metrics of this model on raw rows and raw targets (a champion on new data).

        Rows that the model's own ``drop_rows`` imputation cannot take are left out, as they
        are from every evaluation split.
        """
        from trainer.loop import evaluate

        if hasattr(self.preprocessor, "transform_x"):
            x = self.preprocessor.transform_x(_image_array(rows))
            target = self.preprocessor.transform_y(np.asarray(y))
            return evaluate(self.network, x, target, self.task, prefix=prefix)
        y = pd.Series(np.asarray(y), index=rows.index)
        frame = _as_training_kinds(rows[self.feature_columns], self.preprocessor)
        x, target, _ = self.preprocessor.transform(frame, y, drop_missing=True)
        te = self.preprocessor.target_encoder_
        mean, scale = (float(te.mean_), float(te.scale_)) if self.task == "regression" else (
            0.0, 1.0)
        return evaluate(self.network, x, target, self.task, prefix=prefix, y_mean=mean,
                        y_scale=scale)

    def classes(self) -> list[Any]:
        if hasattr(self.preprocessor, "classes_"):
            return list(self.preprocessor.classes_)
        return list(self.preprocessor.target_encoder_.classes_)

    def _decode(self, idx: np.ndarray) -> np.ndarray:
        if hasattr(self.preprocessor, "decode_y"):
            return self.preprocessor.decode_y(idx)
        return np.asarray(self.preprocessor.inverse_transform_target(idx))

    # --- persistence ----------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict, d / "weights.pt")
        preprocessor_state.save(self.preprocessor, d)
        profile.save(self.preprocessor, d)  # the training split's profile (drift)
        meta = {"model_spec": self.model_spec, "input_shape": list(self.input_shape),
                "n_outputs": self.n_outputs, "task": self.task,
                "feature_columns": self.feature_columns, "metrics": self.metrics}
        (d / "bundle.json").write_text(json.dumps(meta, indent=2, default=float))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> ModelBundle:
        d = Path(directory)
        meta = json.loads((d / "bundle.json").read_text())
        pre = preprocessor_state.load(d)  # before the weights: an old artifact fails first
        state = torch.load(d / "weights.pt", map_location="cpu", weights_only=True)
        return cls(preprocessor=pre, model_spec=meta["model_spec"],
                   input_shape=tuple(meta["input_shape"]), n_outputs=meta["n_outputs"],
                   task=meta["task"], state_dict=state,
                   feature_columns=meta["feature_columns"], metrics=meta.get("metrics", {}))


def _image_array(rows: Any) -> np.ndarray:
    if isinstance(rows, pd.DataFrame):
        return rows.to_numpy(dtype=np.float32)
    return np.asarray(rows, dtype=np.float32)


def _as_training_kinds(frame: pd.DataFrame, pre: Any) -> pd.DataFrame:
    """Cast columns to the kind seen in training (a CSV may read a text column as numbers)."""
    kinds = getattr(pre.imputer, "column_kinds_", {})
    out = frame.copy()
    for col, kind in kinds.items():
        if col not in out.columns:
            continue
        numeric = pd.api.types.is_numeric_dtype(out[col])
        if kind == "categorical" and numeric:
            out[col] = out[col].astype("str").where(out[col].notna())
        elif kind == "numeric" and not numeric:
            out[col] = pd.to_numeric(out[col], errors="coerce")
    return out
