"""The arrays a trial trains on, without the fitted preprocessor that made them.

A sweep prepares the data once in the driver and hands every trial these arrays through
Ray's object store. Shipping the whole ``trainer.pipeline.Prepared`` would make every trial
worker unpickle the fitted imputer and encoder, and so import scikit-learn and SciPy, which
a training loop never uses (measured in bench_sweep's 16 x 20 sweep: Tuner.fit to the first
trial result went from 8.4 s to 6.1 s when trials got these arrays instead; see README.md,
Speed). This module imports NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


class Shapes:
    """``input_shape`` and ``n_outputs`` of the splits (arrays here, tensors in
    ``trainer.loop.TensorData``)."""

    x_train: Any
    task: str
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_outputs(self) -> int:
        """Width of the network's last layer: one logit per class, or 1 for regression."""
        return self.n_classes if self.task == "classification" else 1


@dataclass
class ArrayData(Shapes):
    """Train/val/test arrays + target facts, no preprocessor: what a sweep sends its trials."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str
    n_classes: int
    y_mean: float = 0.0
    y_scale: float = 1.0
