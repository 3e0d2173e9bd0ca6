"""The lecture's XOR: two tanh hidden units learn it exactly; a linear model cannot."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.config import ModelSpec, TrainSpec
from trainer.loop import TensorData, evaluate, fit, predict
from trainer.models import build_model

X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
Y = np.array([0, 1, 1, 0], dtype=np.int64)


def train_xor(hidden: list[int], seed: int = 0) -> tuple[TensorData, object]:
    data = TensorData.from_numpy(X, Y, X, Y, X, Y, task="classification")  # train = val = test
    model = ModelSpec(kind="mlp", hidden=hidden, activation="tanh", dropout=0.0)
    train = TrainSpec(epochs=300, batch_size=4, optimizer="adam", lr=0.05,
                     weight_decay=0.0, seed=seed, device="cpu", threads=1)
    result = fit(build_model(model, (2,), 2, seed), data, train)
    return data, result.model


def test_two_hidden_units_classify_all_four_points() -> None:
    data, model = train_xor([2], seed=0)
    np.testing.assert_array_equal(predict(model, X), Y)
    metrics = evaluate(model, data.x_test, data.y_test, data)
    assert metrics["test_accuracy"] == 1.0
    assert metrics["test_loss"] < 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_a_linear_model_cannot(seed: int) -> None:
    data, model = train_xor([], seed=seed)
    assert evaluate(model, data.x_test, data.y_test, data)["test_accuracy"] <= 0.75
    assert (predict(model, X) != Y).any()
