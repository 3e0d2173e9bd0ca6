"""The fitted preprocessing on disk as numbers and names: ``preprocessor.json`` + ``.npz``.

No pickle: what a model artifact holds is data (JSON values and numeric arrays read with
``allow_pickle=False``) that rungwise's own classes are rebuilt from, so a tampered artifact
can give wrong predictions or an error but cannot name code to run. Every fitted attribute of
``Preprocessor`` (imputer, encoder, target encoder) and of ``ImagePreprocessor`` is written
here and nowhere else; a field this module does not know is an error on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainer.encode import Preprocessor, TabularEncoder, TargetEncoder
from trainer.errors import RungwiseError
from trainer.impute import Imputer
from trainer.model_impute import ChainImputer

FORMAT = "rungwise-preprocessor"
VERSION = 1
JSON_NAME, ARRAYS_NAME = "preprocessor.json", "preprocessor.npz"
_NUMERIC_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                   "uint64", "float16", "float32", "float64"}


class PreprocessorFormatError(RungwiseError):
    """The saved preprocessing is not one rungwise wrote (or an older, unsafe format)."""


def save(pre: Any, directory: Path) -> None:
    """Write ``pre`` (a fitted ``Preprocessor`` or ``ImagePreprocessor``) into ``directory``."""
    from trainer.pipeline import ImagePreprocessor

    arrays: dict[str, np.ndarray] = {}
    if isinstance(pre, Preprocessor):
        kind, state = "tabular", _tabular_out(pre, arrays)
    elif isinstance(pre, ImagePreprocessor):
        kind, state = "images", _images_out(pre, arrays)
    else:
        raise TypeError(f"cannot save a preprocessor of type {type(pre).__name__}")
    doc = {"format": FORMAT, "version": VERSION, "kind": kind, "state": state}
    (directory / JSON_NAME).write_text(json.dumps(doc, indent=1))
    with open(directory / ARRAYS_NAME, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def load(directory: Path) -> Any:
    """Rebuild the preprocessor saved in ``directory`` (no pickle is read, ever)."""
    if not (directory / JSON_NAME).is_file():
        if (directory / "preprocessor.pkl").exists():
            raise PreprocessorFormatError(
                "model artifact: its preprocessing is a pickle (preprocessor.pkl), which "
                "rungwise no longer loads because a pickle can run code; re-register the model "
                "with this version of rungwise (`rungwise tune` or `rungwise retrain`)")
        raise PreprocessorFormatError(f"model artifact: {JSON_NAME} is missing")
    try:
        doc = json.loads((directory / JSON_NAME).read_text())
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise PreprocessorFormatError(
            f"model artifact: {JSON_NAME} is not a {FORMAT} version {VERSION} file")
    try:
        with np.load(directory / ARRAYS_NAME, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if doc["kind"] == "tabular":
            return _tabular_in(doc["state"], arrays)
        if doc["kind"] == "images":
            return _images_in(doc["state"], arrays)
        raise KeyError("kind")
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as exc:
        raise PreprocessorFormatError(
            f"model artifact: {JSON_NAME} + {ARRAYS_NAME} do not describe a preprocessor "
            f"({type(exc).__name__}: {exc})") from None


# --- values that are not plain JSON ----------------------------------------------------
def _labels_out(values: np.ndarray) -> dict[str, Any]:
    values = np.asarray(values)
    dtype = str(values.dtype) if str(values.dtype) in _NUMERIC_DTYPES else "object"
    items = [v.item() if isinstance(v, np.generic) else v for v in values.tolist()]
    if dtype == "object" and not all(isinstance(v, str | int | float | bool) for v in items):
        raise TypeError("labels must be numbers or text to be saved")
    return {"dtype": dtype, "values": items}


def _labels_in(doc: dict[str, Any]) -> np.ndarray:
    dtype = doc["dtype"]
    if dtype != "object" and dtype not in _NUMERIC_DTYPES:
        raise ValueError(f"label dtype {dtype!r}")
    if not all(isinstance(v, str | int | float | bool) for v in doc["values"]):
        raise ValueError("labels must be numbers or text")
    return np.asarray(doc["values"], dtype=object if dtype == "object" else np.dtype(dtype))


def _dtype_out(dtype: Any) -> dict[str, Any]:
    if isinstance(dtype, pd.StringDtype):
        return {"string": dtype.storage, "na": "nan" if dtype.na_value is np.nan else "NA"}
    if str(dtype) not in ("float32", "float64"):
        raise TypeError(f"column dtype {dtype}")
    return {"numpy": str(dtype)}


def _dtype_in(doc: dict[str, Any]) -> Any:
    if "numpy" in doc:
        if doc["numpy"] not in ("float32", "float64"):
            raise ValueError(f"column dtype {doc['numpy']!r}")
        return np.dtype(doc["numpy"])
    if doc["string"] not in ("python", "pyarrow") or doc["na"] not in ("nan", "NA"):
        raise ValueError(f"string dtype {doc!r}")
    return pd.StringDtype(doc["string"], na_value=np.nan if doc["na"] == "nan" else pd.NA)


def _pairs(d: dict[Any, Any]) -> list[list[Any]]:
    """A dict as [key, value] pairs: keeps column names that are not text, and their order."""
    return [[k, v] for k, v in d.items()]


def _names(values: Any) -> list[Any]:
    if not isinstance(values, list) or not all(isinstance(v, str | int) for v in values):
        raise ValueError("column names must be a list of text or integers")
    return list(values)


def _plain(value: Any) -> Any:
    if value is not None and not isinstance(value, str | int | float | bool):
        raise ValueError(f"value {value!r}")
    return value


# --- the tabular preprocessor ----------------------------------------------------------
_IMPUTER_LISTS = ("feature_names_in_", "dropped_columns_", "numeric_columns_",
                  "categorical_columns_", "drop_rows_columns_", "indicator_columns_",
                  "feature_names_out_")


def _imputer_out(imp: Imputer, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    state: dict[str, Any] = {"params": imp.get_params()}
    state.update({name: list(getattr(imp, name)) for name in _IMPUTER_LISTS})
    state["column_kinds_"] = _pairs(imp.column_kinds_)
    state["missing_fraction_"] = _pairs(imp.missing_fraction_)
    state["statistics_"] = _pairs(imp.statistics_)
    state["dtypes_"] = [[c, _dtype_out(t)] for c, t in imp.dtypes_.items()]
    state["model_"] = None
    if imp.model_ is not None:
        meta, more = imp.model_.to_state("model_")
        arrays.update(more)
        state["model_"] = meta
    return state


def _imputer_in(state: dict[str, Any], arrays: dict[str, np.ndarray]) -> Imputer:
    params = {k: _plain(v) for k, v in state["params"].items()}
    imp = Imputer(**params)
    imp._validate_params()
    for name in _IMPUTER_LISTS:
        setattr(imp, name, _names(state[name]))
    imp.n_features_in_ = len(imp.feature_names_in_)
    imp.column_kinds_ = {c: k for c, k in state["column_kinds_"] if k in ("numeric", "categorical")}
    imp.missing_fraction_ = {c: float(f) for c, f in state["missing_fraction_"]}
    imp.statistics_ = {c: _plain(v) for c, v in state["statistics_"]}
    imp.dtypes_ = {c: _dtype_in(t) for c, t in state["dtypes_"]}
    model = state["model_"]
    imp.model_ = None if model is None else ChainImputer.from_state(model, arrays, "model_")
    return imp


def _tabular_out(pre: Preprocessor, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    enc, te = pre.encoder_, pre.target_encoder_
    arrays["encoder_mean_"], arrays["encoder_scale_"] = enc.mean_, enc.scale_
    target: dict[str, Any] = {"task_": te.task_, "output_dim_": te.output_dim_}
    if te.task_ == "classification":
        target["classes_"] = _labels_out(te.classes_)
    else:
        target["mean_"], target["scale_"] = te.mean_, te.scale_
    return {"task": pre.task, "imputer": _imputer_out(pre.imputer, arrays),
            "encoder": {"feature_names_in_": list(enc.feature_names_in_),
                        "numeric_columns_": list(enc.numeric_columns_),
                        "categorical_columns_": list(enc.categorical_columns_),
                        "categories_": _pairs(enc.categories_)},
            "target": target}


def _tabular_in(state: dict[str, Any], arrays: dict[str, np.ndarray]) -> Preprocessor:
    pre = Preprocessor(_imputer_in(state["imputer"], arrays), task=str(state["task"]))
    enc, doc = TabularEncoder(), state["encoder"]
    enc.feature_names_in_ = _names(doc["feature_names_in_"])
    enc.numeric_columns_ = _names(doc["numeric_columns_"])
    enc.categorical_columns_ = _names(doc["categorical_columns_"])
    enc.categories_ = {c: [str(v) for v in cats] for c, cats in doc["categories_"]}
    enc.mean_ = np.asarray(arrays["encoder_mean_"], dtype=np.float64)
    enc.scale_ = np.asarray(arrays["encoder_scale_"], dtype=np.float64)
    if len(enc.mean_) != len(enc.numeric_columns_) or len(enc.scale_) != len(enc.mean_):
        raise ValueError("encoder statistics do not match its numeric columns")
    enc._layout()
    te, doc = TargetEncoder(), state["target"]
    te.task_, te.output_dim_ = str(doc["task_"]), int(doc["output_dim_"])
    if te.task_ == "classification":
        te.classes_ = _labels_in(doc["classes_"])
    else:
        te.mean_, te.scale_ = float(doc["mean_"]), float(doc["scale_"])
    pre.encoder_, pre.target_encoder_ = enc, te
    pre.feature_names_out_ = enc.feature_names_out_
    return pre


# --- images ------------------------------------------------------------------------------
def _images_out(pre: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"mean_": pre.mean_, "std_": pre.std_, "classes_": _labels_out(pre.classes_),
            "input_shape_": list(pre.input_shape_)}


def _images_in(state: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    from trainer.pipeline import ImagePreprocessor

    pre = ImagePreprocessor()
    pre.mean_, pre.std_ = float(state["mean_"]), float(state["std_"])
    pre.classes_ = _labels_in(state["classes_"])
    pre.input_shape_ = tuple(int(d) for d in state["input_shape_"])
    return pre
