"""The pyfunc model, logged "from code" so MLflow never unpickles a Python object for it.

MLflow runs this file when it loads the model; ``set_model`` names the model object.
The network's weights load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import warnings

import mlflow
import pandas as pd

from trainer.bundle import ModelBundle

# MLflow suggests type hints for schema validation; the logged signature does that job.
warnings.filterwarnings("ignore", message=".*type hints to the `predict` method",
                        category=UserWarning)


class RungwiseModel(mlflow.pyfunc.PythonModel):
    """Raw rows (missing values allowed) -> labels (classification) or values (regression)."""

    def load_context(self, context):  # type: ignore[no-untyped-def]
        self.bundle = ModelBundle.load(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        rows = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(
            model_input)
        return pd.Series(self.bundle.predict(rows), name="prediction")


mlflow.models.set_model(RungwiseModel())
