"""trainer.config: each allowed value is written once, and every check reads it from there."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from jobs.spec import SpecError, validate_spec
from trainer.config import (
    CATEGORICAL_STRATEGIES,
    NUMERIC_STRATEGIES,
    OPTIMIZERS,
    ImputeSpec,
    TrainSpec,
)
from trainer.impute import Imputer
from trainer.loop import make_optimizer
from trainer.memory import OPTIMIZER_STATE


def refusal(section: str, key: str, value: object) -> str:
    with pytest.raises(SpecError) as err:
        validate_spec({"name": "t", "data": {"path": "t.csv"}, section: {key: value}}, None)
    return str(err.value)


def either(allowed: tuple[str, ...]) -> str:
    """How pydantic lists a Literal's values: 'a', 'b' or 'c'."""
    return ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"


def test_the_spec_lists_exactly_the_optimizers_of_trainer_config() -> None:
    assert refusal("train", "optimizer", "rmsprop") == (
        f"train.optimizer: Input should be {either(OPTIMIZERS)}; got 'rmsprop'")
    assert set(OPTIMIZER_STATE) == set(OPTIMIZERS)  # the memory estimate knows each one
    params = [torch.nn.Parameter(torch.zeros(2))]
    built = {name: type(make_optimizer(params, TrainSpec(optimizer=name))).__name__
             for name in OPTIMIZERS}
    assert built == {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


@pytest.mark.parametrize(("key", "allowed"), [("numeric", NUMERIC_STRATEGIES),
                                              ("categorical", CATEGORICAL_STRATEGIES)])
def test_the_spec_and_the_imputer_refuse_the_same_set(key: str,
                                                      allowed: tuple[str, ...]) -> None:
    assert refusal("impute", key, "zero") == (
        f"impute.{key}: Input should be {either(allowed)}; got 'zero'")
    frame = pd.DataFrame({"n": [1.0, np.nan, 3.0, 4.0], "m": [2.0, 1.0, np.nan, 0.5],
                          "c": ["a", None, "b", "a"]})
    with pytest.raises(ValueError) as err:
        Imputer(**{key: "zero"}).fit(frame)
    assert str(err.value) == f"impute.{key}: got 'zero', allowed: {', '.join(allowed)}"
    for name in allowed:  # every value the spec allows, the Imputer takes
        spec = ImputeSpec(**{key: name, "fill_value": 0 if key == "numeric" else None})
        out = Imputer(**spec.model_dump()).fit_transform(frame)
        assert out.isna().sum().sum() == 0
