"""The memory estimate of one run, before it starts: counts match the real network, and a run
that cannot fit is refused with one line naming the key."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trainer.config import ModelSpec, TrainSpec
from trainer.memory import check_fits, estimate
from trainer.models import OutOfMemory, build_model, count_parameters, explain_oom

HUGE = [200000, 200000]
ADAMW = TrainSpec(batch_size=256, optimizer="adamw")


def model(**kw: Any) -> ModelSpec:
    base = {"kind": "mlp", "hidden": [64, 32], "activation": "relu", "dropout": 0.0,
            "channels": [16, 32], "kernel_size": 3, "pool": "max"}
    return ModelSpec(**{**base, **kw})


@pytest.mark.parametrize(("spec", "shape", "n_out"), [
    (model(), (108,), 2), (model(hidden=[]), (8,), 1), (model(dropout=0.2), (3, 4, 4), 10),
    (model(kind="cnn"), (1, 8, 8), 10), (model(kind="cnn", pool="none"), (8, 8), 3),
    (model(kind="cnn", channels=[4, 4, 4, 4, 4], kernel_size=5), (3, 5, 7), 2),
])
def test_the_parameter_count_is_the_real_networks(spec: ModelSpec,
                                                  shape: tuple[int, ...], n_out: int) -> None:
    assert estimate(spec, ADAMW, shape, n_out).parameters == count_parameters(
        build_model(spec, shape, n_out, seed=0))


def test_weights_gradients_and_optimizer_state() -> None:
    est = estimate(model(hidden=[10]), ADAMW, (5,), 1)
    assert est.parameters == 6 * 10 + 11 * 1
    assert (est.weights, est.training_state) == (71 * 4, 3 * 71 * 4)  # grads + 2 moments
    sgd = estimate(model(hidden=[10]), TrainSpec(batch_size=256, optimizer="sgd"), (5,), 1)
    assert sgd.training_state == 2 * 71 * 4  # grads + momentum


def test_a_model_that_cannot_fit_is_refused_naming_its_layers() -> None:
    with pytest.raises(OutOfMemory) as info:
        check_fits(model(hidden=HUGE), ADAMW, (108,), 2, 64 * 2**30, "this machine")
    assert str(info.value) == (
        "model.hidden=[200000, 200000] needs about 597.9 GiB to train (weights 149.1 GiB, "
        "gradients and adamw state 447.3 GiB, activations of batch_size 256 1.5 GiB); "
        "this machine has 64.0 GiB: lower it")


def test_a_batch_that_cannot_fit_is_refused_naming_the_batch_size() -> None:
    train = TrainSpec(batch_size=2**24, optimizer="adam")
    with pytest.raises(OutOfMemory, match=r"^tune\.space\.train\.batch_size: the largest value "
                                          r"16777216 needs about \d+\.\d GiB"):
        check_fits(model(hidden=[4096]), train, (1000,), 2, 2**30, "the largest node",
                   {"train.batch_size": "tune.space.train.batch_size: the largest value "
                                        "16777216"})


def test_a_cnn_is_named_by_its_channels_when_they_dominate() -> None:
    with pytest.raises(OutOfMemory, match=r"^model\.channels=\[4096, 4096\] needs about"):
        check_fits(model(kind="cnn", channels=[4096, 4096], hidden=[]), ADAMW, (3, 4, 4), 10,
                   2**30, "this machine")


def test_what_fits_is_returned() -> None:
    est = check_fits(model(), ADAMW, (108,), 2, 2**30, "this machine")
    assert 0 < est.total < 2**30


def test_the_after_the_fact_message_uses_the_same_estimate() -> None:
    err = explain_oom(torch.OutOfMemoryError("CUDA out of memory"), model(hidden=HUGE), ADAMW,
                      108)
    assert str(err).startswith("out of memory: model.hidden=[200000, 200000] needs about "
                               "149.1 GiB for its weights; lower it and retry")
