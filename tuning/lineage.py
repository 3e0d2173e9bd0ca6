"""Which data trained a run, in MLflow's dataset API: the UI's Dataset column.

Every run that trains (``rungwise train``, a sweep's parent and each trial's child, a
retrain's refit) logs one input with context ``training``: the source (``data.path``, secrets
masked), rungwise's content fingerprint as the digest (the ``rungwise.data_fingerprint`` tag:
new data, new digest), the columns with their types, and the training rows as the profile.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from trainer.config import DataSpec

CONTEXT = "training"


def _dtype(series_dtype: Any) -> str:
    if pd.api.types.is_bool_dtype(series_dtype):
        return "boolean"
    if pd.api.types.is_integer_dtype(series_dtype):
        return "long"
    if pd.api.types.is_numeric_dtype(series_dtype):
        return "double"
    return "string"


def training_input(path: str, fingerprint: str, frame: pd.DataFrame | None, rows: int,
                   name: str) -> Any:
    """A ``DatasetInput`` for ``log_inputs``; ``frame`` gives the columns (None: images)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import DataType
    from mlflow.types.schema import ColSpec, Schema
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from tuning.secrets import mask_uri

    class _Counted(MetaDataset):  # MetaDataset has no profile: the row count is ours
        @property
        def profile(self) -> Any:
            return {"num_rows": rows}

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    schema = None if frame is None else Schema(
        [ColSpec(DataType[_dtype(t)], str(c)) for c, t in frame.dtypes.items()])
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(mask_uri(str(path)))
    dataset = _Counted(source=source, name=name, digest=fingerprint, schema=schema)
    return DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, CONTEXT)])


def from_raw(data: DataSpec, raw: Any) -> Any:
    """The training split of a sweep's (or retrain's) ``SplitData``."""
    train = raw.train
    frame = None if raw.is_images else train
    return training_input(data.path, raw.fingerprint, frame, len(train), _name(data))


def from_prepared(data: DataSpec, prepared: Any) -> Any:
    """``rungwise train``: columns from the raw example rows, rows from the training split."""
    frame = prepared.example
    return training_input(data.path, prepared.fingerprint, frame,
                          int(prepared.info.get("rows_train", 0)), _name(data))


def _name(data: DataSpec) -> str:
    from pathlib import PurePosixPath

    return PurePosixPath(str(data.path).split("?", 1)[0]).name or "data"


def log_training_input(client: Any, run_id: str, dataset_input: Any) -> None:
    if dataset_input is not None:
        client.log_inputs(run_id, datasets=[dataset_input])
