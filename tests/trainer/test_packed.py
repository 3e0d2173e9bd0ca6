"""Packed training equals unpacked training (trainer.loop.fit), member by member."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from trainer.config import EarlyStoppingSpec, ModelSpec, TrainSpec
from trainer.loop import TensorData, fit
from trainer.models import build_model
from trainer.packed import Member, Pack, fit_packed, pack_key, pack_pays

TOL = {"rtol": 2e-5, "atol": 2e-6}


def _data(task: str, rows: int = 300, features: int = 7) -> TensorData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(np.int64) if task == "classification" \
        else (x[:, 0] - 2 * x[:, 3] + 0.1 * rng.normal(size=rows)).astype(np.float32)
    a, b = int(rows * 0.6), int(rows * 0.8)
    return TensorData.from_numpy(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], task=task,
                                 y_mean=1.5, y_scale=2.0)


def _train(**kw: Any) -> TrainSpec:
    base = {"epochs": 4, "batch_size": 32, "optimizer": "adamw", "lr": 1e-2, "momentum": 0.9,
            "weight_decay": 0.0, "lr_schedule": "none", "step_size": 2, "gamma": 0.5,
            "grad_clip": None, "early_stopping": None, "seed": 0, "device": "cpu",
            "threads": 1}
    return TrainSpec(**{**base, **kw})


def _model(**kw: Any) -> ModelSpec:
    return ModelSpec(**{"kind": "mlp", "hidden": [16, 8], "activation": "relu", "dropout": 0.0,
                        **kw})


def _compare(model: ModelSpec, data: TensorData, trains: list[TrainSpec], dropouts: list[float],
             size: int | None = None) -> None:
    members = [Member.from_spec(_model(dropout=p), t, key=i)
               for i, (t, p) in enumerate(zip(trains, dropouts, strict=True))]
    packed = fit_packed(model, data, members, trains[0], size=size)
    for i, (t, p) in enumerate(zip(trains, dropouts, strict=True)):
        m = _model(hidden=model.hidden, activation=model.activation, dropout=p)
        ref = fit(build_model(m, data.input_shape, data.n_outputs, t.seed), data, t)
        got = packed[i]
        assert got.key == i and got.status == "finished"
        assert [h["epoch"] for h in got.history] == [h["epoch"] for h in ref.history]
        assert set(got.history[0]) == set(ref.history[0])
        for mine, theirs in zip(got.history, ref.history, strict=True):
            for k in theirs:
                if isinstance(theirs[k], str):  # stop_reason: fit's sentence, word for word
                    assert mine[k] == theirs[k], (i, k)
                elif k != "epoch_time_s":
                    assert mine[k] == pytest.approx(theirs[k], rel=1e-4, abs=1e-6), (i, k)
        assert (got.best_epoch, got.stopped_early) == (ref.best_epoch, ref.stopped_early)
        for a, b in zip(got.model.state_dict().values(), ref.model.state_dict().values(),
                        strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_adamw_members_with_own_lr_decay_dropout_seed_equal_fit() -> None:
    stop = EarlyStoppingSpec(patience=1, min_delta=0.0)
    trains = [_train(lr=1e-2, seed=0), _train(lr=3e-3, weight_decay=1e-2, seed=1),
              _train(lr=3e-2, seed=2, early_stopping=stop, epochs=6),
              _train(lr=1e-3, seed=3, lr_schedule="cosine")]
    _compare(_model(), _data("classification"), trains, [0.0, 0.2, 0.0, 0.5])


def test_sgd_momentum_members_equal_fit_more_members_than_slots() -> None:
    trains = [_train(optimizer="sgd", lr=0.05, momentum=m, seed=s, epochs=e)
              for m, s, e in ((0.9, 0, 3), (0.0, 1, 5), (0.5, 2, 2), (0.99, 3, 4), (0.8, 4, 3))]
    _compare(_model(activation="tanh"), _data("classification"), trains, [0.1] * 5, size=2)


def test_regression_adam_grad_clip_step_schedule_equal_fit() -> None:
    trains = [_train(optimizer="adam", lr=2e-2, grad_clip=c, lr_schedule="step", seed=s,
                     weight_decay=1e-3) for c, s in ((0.5, 0), (None, 1), (5.0, 2))]
    _compare(_model(hidden=[12]), _data("regression"), trains, [0.0, 0.1, 0.0])


def test_diverged_and_stopped_members_leave_the_others_as_they_were() -> None:
    data, train = _data("classification"), _train(epochs=3)
    good = [Member(key=k, lr=1e-2, seed=s, epochs=3) for s, k in enumerate("ab")]
    alone = fit_packed(_model(), data, good, train)
    wild = Member(key="nan", lr=1e12, seed=5, epochs=3)  # diverges in its first epoch
    stopped = Member(key="asha", lr=1e-2, seed=6, epochs=3)
    late = Member(key="late", lr=1e-2, seed=7, epochs=2)  # takes a freed slot
    out = fit_packed(_model(), data, [good[0], wild, stopped, good[1], late], train, size=4,
                     on_epoch=lambda key, m: key == "asha" and m["epoch"] == 1)
    by_key = {r.key: r for r in out}
    assert by_key["nan"].status == "diverged" and "train.lr: loss became" in by_key["nan"].error
    assert by_key["asha"].status == "stopped" and by_key["asha"].epochs_run == 1
    assert by_key["late"].status == "finished" and by_key["late"].epochs_run == 2
    for ref in alone:
        assert [h["val_loss"] for h in by_key[ref.key].history] == pytest.approx(
            [h["val_loss"] for h in ref.history], rel=1e-6)


def test_pack_refuses_a_sixth_member_and_a_cnn() -> None:
    data = _data("classification")
    pack = Pack(_model(), data, size=1, batch_size=16)
    pack.add(Member(lr=1e-3))
    with pytest.raises(RuntimeError, match="all 1 slots are running"):
        pack.add(Member(lr=1e-3))
    with pytest.raises(ValueError, match="model.kind: packing trains MLPs only"):
        Pack(_model(kind="cnn"), data, size=2, batch_size=16)
    assert pack_key(_model(), _train()) == pack_key(_model(dropout=0.3), _train(lr=5.0, seed=9))
    assert pack_key(_model(), _train()) != pack_key(_model(hidden=[8]), _train())


def test_a_member_checkpointed_in_one_pack_resumes_in_another_as_if_uninterrupted() -> None:
    data, model = _data("classification"), _model()
    member = Member(key="m", lr=1e-2, seed=3, epochs=4, dropout=0.2, patience=3)
    whole = fit_packed(model, data, [member], _train())[0]
    first = Pack(model, data, size=2, batch_size=32)
    slot = first.add(member)
    first.add(Member(lr=5e-3, seed=9, epochs=4))
    first.run_epoch()
    first.run_epoch()
    ckpt = first.checkpoint(slot)
    second = Pack(model, data, size=3, batch_size=32)
    second.add(Member(lr=1e-3, seed=1, epochs=4))  # other company, another slot
    moved = second.add(member, ckpt)
    while second.running():
        second.run_epoch()
    got = second.result(moved)
    assert got.epochs_run == 4 and got.status == "finished"
    assert [h["val_loss"] for h in got.history] == pytest.approx(
        [h["val_loss"] for h in whole.history], rel=1e-6)


def test_pack_pays_follows_the_measured_rule() -> None:
    cpu = {((32,), 64): True, ((64,), 128): True, ((128, 64), 512): True,
           ((128, 64), 1024): False, ((256,), 64): False, ((256, 128), 128): False}
    for (hidden, batch), expected in cpu.items():
        assert pack_pays(_model(hidden=list(hidden)), batch, "cpu") is expected, (hidden, batch)
    assert pack_pays(_model(hidden=[256, 128]), 128, "cuda") is True
    assert pack_pays(_model(kind="cnn"), 64, "cpu") is False
