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

import trainer
from trainer.bundle import ModelBundle
from trainer.inputs import as_declared, conform, input_columns, is_tabular
from tuning.errors import RungwiseError
from tuning.secrets import mask_uri

CHAMPION, CHALLENGER = "champion", "challenger"


def log_bundle(run_id: str, bundle: ModelBundle, example: pd.DataFrame | None,
               uri: str, name: str = "model") -> str:
    """Log the bundle as a portable pyfunc model (signature, input example, the ``trainer``
    package as its code, pinned requirements) to ``run_id``; returns the model's URI."""
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = bundle.save(Path(tmp) / "bundle")
        signature = None
        if example is not None and is_tabular(bundle):
            example = as_declared(example, input_columns(bundle, example))
            signature = model_signature(bundle, example)
        with mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=name, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"bundle": str(path)},
                signature=signature, input_example=example,
                code_paths=[str(Path(trainer.__file__).resolve().parent)],
                pip_requirements=requirements())
    return str(info.model_uri)


def model_signature(bundle: ModelBundle, example: pd.DataFrame) -> Any:
    """Typed columns, optional exactly where the imputer can fill them (``trainer.inputs``);
    MLflow's own schema enforcement then refuses a word in a numeric column, naming it."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    columns = input_columns(bundle, example)
    inputs = Schema([ColSpec(DataType[c.type], c.name, required=c.required) for c in columns])
    prediction = np.asarray(bundle.predict(conform(bundle, example)))
    outputs = Schema([TensorSpec(prediction.dtype, (-1,))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """What loading and predicting import (the model's code is ``trainer/``, logged with it):
    scikit-learn because ``trainer.impute`` / ``trainer.encode`` subclass its BaseEstimator;
    pyarrow because pandas keeps the text columns' dtype in it."""
    import pyarrow
    import sklearn
    import torch

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={np.__version__}", f"pandas=={pd.__version__}",
            f"pyarrow=={pyarrow.__version__}", f"scikit-learn=={sklearn.__version__}"]


def register(uri: str, model_uri: str, name: str, run_id: str) -> tuple[str, list[str]]:
    """Register a new version; alias it ``challenger``, and ``champion`` if there is none."""
    mlflow.set_tracking_uri(uri)  # MLflow's registry looks a models:/m-... source up globally
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
