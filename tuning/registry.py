"""The model that reaches the MLflow registry: imputer + encoder + network as one pyfunc.

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(raw_df)`` takes raw rows that
still have missing values and returns labels (classification) or values (regression).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from trainer.bundle import ModelBundle
from tuning.errors import RungwiseError
from tuning.secrets import mask_uri

CHAMPION, CHALLENGER = "champion", "challenger"


def log_bundle(*args: Any, **kwargs: Any) -> str:
    """See ``_log_bundle``; MLflow's advice about type hints is noise for this model."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _log_bundle(*args, **kwargs)


def _log_bundle(run_id: str, bundle: ModelBundle, example: pd.DataFrame | None,
               uri: str, name: str = "model") -> str:
    """Log the bundle as a pyfunc model (with signature and input example) to ``run_id``."""
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = bundle.save(Path(tmp) / "bundle")
        signature = None
        if example is not None:
            signature = _signature(example, bundle.predict(example))
        with mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=name, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"bundle": str(path)},
                signature=signature, input_example=example,
                code_paths=None, pip_requirements=_requirements())
    return str(info.model_uri)


def _signature(example: pd.DataFrame, prediction: Any) -> Any:
    """Every input column named and optional, of any type: the model takes raw rows in which
    an int column may arrive as floats (a missing value) and a column may be absent from
    the data entirely; the bundle itself checks and casts. MLflow's inferred schema would
    refuse int64 -> float64 and missing optional values."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inputs = Schema([ColSpec(AnyType(), str(c), required=False) for c in example.columns])
    outputs = infer_signature(example, prediction).outputs
    return ModelSignature(inputs=inputs, outputs=outputs)


def _requirements() -> list[str]:
    import sklearn
    import torch

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"pandas=={pd.__version__}", f"scikit-learn=={sklearn.__version__}",
            f"numpy=={np.__version__}", "rungwise"]


def register(uri: str, model_uri: str, name: str, run_id: str) -> tuple[str, list[str]]:
    """Register a new version; alias it ``challenger``, and ``champion`` if there is none."""
    cl = mlflow.tracking.MlflowClient(tracking_uri=uri)
    try:
        cl.get_registered_model(name)
    except Exception:
        cl.create_registered_model(name, description="Registered by rungwise")
    # MLflow 3's server wants the logged model's id with a models:/m-... source
    model_id = model_uri.rsplit("/", 1)[-1] if model_uri.startswith("models:/m-") else None
    version = cl.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
    aliases = [CHALLENGER]
    cl.set_registered_model_alias(name, CHALLENGER, version.version)
    if alias_version(uri, name, CHAMPION) is None:
        cl.set_registered_model_alias(name, CHAMPION, version.version)
        aliases.append(CHAMPION)
    return str(version.version), aliases


def alias_version(uri: str, name: str, alias: str) -> Any | None:
    cl = mlflow.tracking.MlflowClient(tracking_uri=uri)
    try:
        return cl.get_model_version_by_alias(name, alias)
    except Exception:
        return None


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    mlflow.tracking.MlflowClient(tracking_uri=uri).set_registered_model_alias(
        name, alias, version)


def load_bundle(uri: str, name: str, alias: str) -> ModelBundle:
    """The bundle behind ``models:/name@alias`` (downloaded), or a one-line error."""
    version = alias_version(uri, name, alias)
    if version is None:
        raise RungwiseError(f"registry: no model version {name}@{alias} at {mask_uri(uri)}; "
                            "run `rungwise tune` first or pick another --alias")
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}")
    return ModelBundle.load(Path(local) / "artifacts" / "bundle")
