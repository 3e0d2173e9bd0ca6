"""Which trial configs of a search space are checked against the largest node's memory."""

from __future__ import annotations

from typing import Any

from jobs.spec import validate_spec
from tuning.fits import extremes


def spec(space: dict[str, Any], **train: Any) -> Any:
    return validate_spec({"name": "t", "data": {"path": "/t.csv"}, "train": train,
                          "tune": {"space": space}}, base_dir=None)


def test_without_a_space_the_specs_own_values_are_checked() -> None:
    assert extremes(spec({}, batch_size=64)) == [({}, {})]


def test_every_layer_choice_at_the_largest_batch_and_optimizer_state() -> None:
    got = extremes(spec({"model.hidden": {"choice": [[16], [200000, 200000]]},
                         "train.batch_size": {"randint": [16, 4096]},
                         "train.optimizer": {"choice": ["sgd", "adamw"]},
                         "train.lr": {"loguniform": [1e-4, 1e-1]}}))
    batch = "tune.space.train.batch_size: the largest value 4096"
    assert got == [
        ({"train.batch_size": 4096, "train.optimizer": "adamw", "model.hidden": [16]},
         {"train.batch_size": batch, "model.hidden": "tune.space.model.hidden: the choice [16]"}),
        ({"train.batch_size": 4096, "train.optimizer": "adamw",
          "model.hidden": [200000, 200000]},
         {"train.batch_size": batch,
          "model.hidden": "tune.space.model.hidden: the choice [200000, 200000]"})]


def test_layer_choices_combine() -> None:
    got = extremes(spec({"model.kind": {"choice": ["mlp", "cnn"]},
                         "model.channels": {"grid": [[8], [64, 64]]}}))
    assert [o for o, _ in got] == [
        {"model.kind": k, "model.channels": c} for k in ("mlp", "cnn") for c in ([8], [64, 64])]
