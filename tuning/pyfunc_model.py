"""The pyfunc model, logged "from code" so MLflow never unpickles a Python object for it.

MLflow runs this file when it loads the model, after putting the model's own ``code/`` folder
(the ``trainer`` package, logged with it) first on ``sys.path``: the model loads where
rungwise is not installed. ``set_model`` names the model object. The network's weights load
with ``torch.load(weights_only=True)``.

``predict`` is typed with a DataFrame: MLflow then neither infers a schema from the hint nor
asks for one, and enforces the logged signature (typed columns, optional where the imputer
fills) before the rows reach it.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModelContext
from mlflow.pyfunc.model import PythonModel

from trainer.bundle import ModelBundle
from trainer.inputs import conform, is_tabular


class RungwiseModel(PythonModel):
    """Raw rows (missing values allowed) -> labels (classification) or values (regression)."""

    def load_context(self, context: PythonModelContext) -> None:
        self.bundle = ModelBundle.load(context.artifacts["bundle"])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.Series:
        rows = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(
            model_input)
        if is_tabular(self.bundle):  # absent optional columns = missing values
            rows = conform(self.bundle, rows)
        return pd.Series(self.bundle.predict(rows), name="prediction")


mlflow.models.set_model(RungwiseModel())
