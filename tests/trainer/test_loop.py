"""trainer.loop: callbacks, early stopping, divergence, exact resume, determinism, DDP."""

from __future__ import annotations

import importlib
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.config import EarlyStoppingSpec, ModelSpec, TrainSpec
from trainer.loop import (
    DivergedError,
    TensorData,
    evaluate,
    fit,
    predict,
    train_step,
)
from trainer.metrics import classification_loss
from trainer.models import build_model


def train_spec(**overrides: Any) -> TrainSpec:
    """The spec's train section, small and fast by default."""
    spec = dict(epochs=4, batch_size=32, optimizer="adamw", lr=1e-2, momentum=0.9,
                weight_decay=0.0, lr_schedule="none", step_size=10, gamma=0.1, grad_clip=None,
                early_stopping=None, seed=0, device="cpu", threads=1, deterministic=False)
    spec.update(overrides)
    return TrainSpec(**spec)


def model_spec(hidden: list[int] | None = None, dropout: float = 0.1) -> ModelSpec:
    return ModelSpec(kind="mlp", hidden=[16] if hidden is None else hidden,
                           activation="relu", dropout=dropout)


def make_data(task: str = "classification", n: int = 300, d: int = 6, seed: int = 0,
              label_noise: float = 0.0) -> TensorData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    signal = x @ rng.normal(size=d)
    a, b = int(n * 0.6), int(n * 0.8)
    if task == "regression":  # original units: thousands; the network sees z-scores
        y = 5000 + 1000 * signal + 100 * rng.normal(size=n)
        mean, scale = float(y[:a].mean()), float(y[:a].std())
        z = (y - mean) / scale
        return TensorData.from_numpy(x[:a], z[:a], x[a:b], z[a:b], x[b:], z[b:], task,
                                     y_mean=mean, y_scale=scale)
    y = (signal > 0).astype(np.int64)
    flip = rng.random(n) < label_noise
    y[flip] = 1 - y[flip]
    return TensorData.from_numpy(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], task)


def run(data: TensorData, spec: TrainSpec, mspec: ModelSpec | None = None,
        **kwargs: Any) -> Any:
    net = build_model(mspec or model_spec(), data.input_shape, data.n_outputs, seed=spec.seed)
    return fit(net, data, spec, **kwargs)


def no_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                b.state_dict().values(), strict=True))


def test_tensor_data_dtypes_and_shapes() -> None:
    data = make_data()
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.n_classes == 2 and data.n_outputs == 2 and data.input_shape == (6,)
    reg = make_data("regression")
    assert reg.y_train.dtype == torch.float32 and reg.n_classes == 0 and reg.n_outputs == 1
    assert reg.to("cpu").y_scale == reg.y_scale


@pytest.mark.parametrize(("task", "key"), [("classification", "val_accuracy"),
                                           ("regression", "val_rmse")])
def test_callback_once_per_epoch_with_fixed_names(task: str, key: str) -> None:
    calls: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    result = run(make_data(task), train_spec(epochs=4), on_epoch=lambda m, c: calls.append((m, c)),
                 checkpoint_every=2)
    assert [m["epoch"] for m, _ in calls] == [1, 2, 3, 4]
    for metrics, _ in calls:
        assert set(metrics) == {"epoch", "train_loss", "val_loss", key, "lr", "epoch_time_s"}
        assert all(math.isfinite(v) for v in metrics.values())
    assert [c is not None for _, c in calls] == [False, True, False, True]
    assert no_time(result.history) == no_time([m for m, _ in calls])
    assert result.epochs_run == 4 and not result.stopped_early


def test_early_stopping_stops_and_restores_best_weights() -> None:
    data = make_data(n=120, label_noise=0.3)
    spec = train_spec(epochs=300, lr=3e-2, batch_size=16,
                      early_stopping=EarlyStoppingSpec(patience=3, min_delta=0.0))
    result = run(data, spec, model_spec([128, 128], dropout=0.0))
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + 3 < 300
    losses = [h["val_loss"] for h in result.history]
    assert result.best_val_loss == min(losses) == losses[result.best_epoch - 1]
    now = evaluate(result.model, data.x_val, data.y_val, data, prefix="val_")
    assert now["val_loss"] == result.best_val_loss


def test_the_epoch_that_stops_early_says_so_and_no_other_does() -> None:
    """Early stopping is decided in ``fit`` and reported with the epoch (Tune's callback and
    the CLI read it; nobody replays the rule on the val_loss curve)."""
    data = make_data(n=120, label_noise=0.3)
    spec = train_spec(epochs=300, lr=3e-2, batch_size=16,
                      early_stopping=SimpleNamespace(patience=3, min_delta=0.0))
    seen: list[dict[str, Any]] = []
    result = run(data, spec, model_spec([128, 128], dropout=0.0),
                 on_epoch=lambda m, c: seen.append(m))
    assert [m["epoch"] for m in seen if "stopped_early" in m] == [result.epochs_run]
    last = seen[-1]
    assert last["stopped_early"] == 1
    assert last["stop_reason"] == (
        f"train.early_stopping: val_loss did not improve on {result.best_val_loss:.6g} "
        f"(epoch {result.best_epoch}) by more than 0 for 3 epochs")
    assert all("stop_reason" not in m for m in seen[:-1])


def test_until_epoch_at_the_checkpoint_trains_no_more_and_loads_the_best_weights() -> None:
    """How a finished trial's model is rebuilt from its last checkpoint (tuning/results.py)."""
    data = make_data(n=120, label_noise=0.3)
    spec = train_spec(epochs=12, lr=3e-2, batch_size=16)
    ckpts: list[dict[str, Any]] = []
    full = run(data, spec, model_spec([128, 128], dropout=0.0),
               on_epoch=lambda m, c: ckpts.append(c()) if m["epoch"] == 8 and c else None)
    calls: list[int] = []
    again = run(data, spec, model_spec([128, 128], dropout=0.0), checkpoint=ckpts[0],
                until_epoch=8, on_epoch=lambda m, c: calls.append(m["epoch"]))
    assert calls == [] and again.epochs_run == 8
    best8 = min(full.history[:8], key=lambda h: h["val_loss"])
    assert again.best_epoch == best8["epoch"] and again.best_val_loss == best8["val_loss"]
    now = evaluate(again.model, data.x_val, data.y_val, data, prefix="val_")["val_loss"]
    assert now == best8["val_loss"]


def test_best_weights_restored_without_early_stopping() -> None:
    data = make_data(n=120, label_noise=0.3)
    result = run(data, train_spec(epochs=25, lr=3e-2, batch_size=16),
                 model_spec([128, 128], dropout=0.0))
    assert result.epochs_run == 25 and not result.stopped_early
    assert result.best_epoch < 25  # it overfits, so the last epoch is not the best
    now = evaluate(result.model, data.x_val, data.y_val, data, prefix="val_")["val_loss"]
    assert now == result.best_val_loss == min(h["val_loss"] for h in result.history)


def test_nan_loss_raises_diverged_error_naming_train_lr() -> None:
    data = make_data()
    data.x_train[5, 0] = float("nan")
    with pytest.raises(DivergedError) as err:
        run(data, train_spec(lr=1e-3))
    assert str(err.value) == ("train.lr: loss became nan at epoch 1 (lr=0.001); "
                              "lower train.lr or set train.grad_clip")
    assert isinstance(err.value, RuntimeError)


def test_huge_lr_diverges() -> None:
    with pytest.raises(DivergedError, match=r"^train\.lr: loss became (nan|inf) at epoch \d+ "
                                            r"\(lr=5\); lower train\.lr or set train\.grad_clip$"):
        run(make_data("regression"), train_spec(optimizer="sgd", lr=5.0, epochs=20))


def test_same_seed_same_history_to_the_last_digit() -> None:
    data = make_data()
    spec = train_spec(epochs=5, lr_schedule="cosine")
    a, b = run(data, spec), run(data, spec)
    assert no_time(a.history) == no_time(b.history)
    assert same_weights(a.model, b.model)
    c = run(data, train_spec(epochs=5, lr_schedule="cosine", seed=1))
    assert no_time(c.history) != no_time(a.history)


def test_resume_after_interruption_is_exact(tmp_path: Path) -> None:
    data = make_data()
    spec = train_spec(epochs=6, lr_schedule="cosine",
                      early_stopping=EarlyStoppingSpec(patience=50, min_delta=0.0))
    full = run(data, spec)

    class Stop(Exception):
        pass

    def save_then_die(metrics: dict[str, Any], ckpt: Any) -> None:
        if metrics["epoch"] == 3:
            assert ckpt is not None
            save_checkpoint(ckpt(), tmp_path / "ckpt.pt")
            raise Stop

    with pytest.raises(Stop):
        run(data, spec, on_epoch=save_then_die)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    resumed = run(data, spec, checkpoint=ckpt)
    assert no_time(resumed.history) == no_time(full.history)
    assert same_weights(resumed.model, full.model)
    assert resumed.best_epoch == full.best_epoch and resumed.epochs_run == 6


def test_three_epochs_plus_three_equals_six() -> None:
    data = make_data()
    six = train_spec(epochs=6, lr_schedule="step", step_size=2, gamma=0.5)
    three = train_spec(epochs=3, lr_schedule="step", step_size=2, gamma=0.5)
    full = run(data, six)
    ckpts: list[dict[str, Any] | None] = []
    run(data, three, on_epoch=lambda m, c: ckpts.append(c() if c else None))
    resumed = run(data, six, checkpoint=ckpts[-1])
    assert no_time(resumed.history) == no_time(full.history)
    assert same_weights(resumed.model, full.model)


@pytest.mark.parametrize("schedule", ["none", "cosine", "step"])
def test_lr_schedules(schedule: str) -> None:
    spec = train_spec(epochs=6, lr=0.1, lr_schedule=schedule, step_size=2, gamma=0.5)
    lrs = [h["lr"] for h in run(make_data(n=100), spec).history]
    if schedule == "none":
        expected = [0.1] * 6
    elif schedule == "cosine":
        expected = [0.05 * (1 + math.cos(math.pi * e / 6)) for e in range(6)]
    else:
        expected = [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_grad_clip_bounds_the_gradient_norm() -> None:
    data = make_data()
    net = build_model(model_spec(), data.input_shape, 2, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the step leaves weights alone

    def grad_norm(clip: float | None) -> float:
        loss = train_step(net, data.x_train, data.y_train * 0 + 1, classification_loss, opt,
                          grad_clip=clip)
        assert loss.ndim == 0 and not loss.requires_grad
        grads = [p.grad.flatten() for p in net.parameters() if p.grad is not None]
        return float(torch.cat(grads).norm())

    assert grad_norm(None) > 1e-2
    assert grad_norm(1e-2) == pytest.approx(1e-2, rel=1e-4)


def test_regression_metrics_in_original_units() -> None:
    from sklearn.metrics import mean_absolute_error, r2_score

    data = make_data("regression", n=400)
    result = run(data, train_spec(epochs=40, lr=3e-2, batch_size=64), model_spec([], 0.0))
    test = evaluate(result.model, data.x_test, data.y_test, data)
    assert set(test) == {"test_loss", "test_rmse", "test_mae", "test_r2"}
    y_true = data.y_test.numpy().astype(np.float64) * data.y_scale + data.y_mean
    y_pred = predict(result.model, data.x_test, data.y_mean, data.y_scale)
    assert test["test_rmse"] == pytest.approx(np.sqrt(np.mean((y_pred - y_true) ** 2)), rel=1e-4)
    assert test["test_mae"] == pytest.approx(mean_absolute_error(y_true, y_pred), rel=1e-4)
    assert test["test_r2"] == pytest.approx(r2_score(y_true, y_pred), abs=1e-5)
    assert test["test_rmse"] == pytest.approx(math.sqrt(test["test_loss"]) * data.y_scale,
                                              rel=1e-4)
    assert 50 < test["test_rmse"] < 200  # a linear model; the noise is 100 in original units
    best = result.history[result.best_epoch - 1]
    val = evaluate(result.model, data.x_val, data.y_val, data, prefix="val_", extended=False)
    assert val == {"val_loss": best["val_loss"], "val_rmse": best["val_rmse"]}


def test_binary_classification_reports_roc_auc() -> None:
    data = make_data(n=400)
    result = run(data, train_spec(epochs=10))
    test = evaluate(result.model, data.x_test, data.y_test, data)
    assert set(test) == {"test_loss", "test_accuracy", "test_roc_auc"}
    assert test["test_accuracy"] > 0.85 and test["test_roc_auc"] > 0.9


def test_checkpoint_round_trips(tmp_path: Path) -> None:
    ckpts: list[dict[str, Any] | None] = []
    run(make_data(), train_spec(epochs=2, lr_schedule="cosine"),
        on_epoch=lambda m, c: ckpts.append(c() if c else None))
    ckpt = ckpts[-1]
    assert ckpt is not None
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "sub" / "c.pt"))
    assert loaded.keys() == ckpt.keys()
    assert loaded["epoch"] == 2 and loaded["history"] == ckpt["history"]
    assert torch.equal(loaded["rng"], ckpt["rng"]) and loaded["rng"].dtype == torch.uint8
    for key, value in ckpt["model"].items():
        assert torch.equal(loaded["model"][key], value)


class _Payload:
    """Unpickling this would create a file: proof that load_checkpoint ran no code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"checkpoint\.evil: _Payload is not allowed"):
        save_checkpoint({"evil": _Payload(marker)}, tmp_path / "never.pt")


# --- DDP on CPU (gloo) -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a hang fails, not waits
    try:
        data = make_data(n=503)  # 301 training rows: odd, so the shards need trimming
        net = build_model(model_spec(dropout=0.3), data.input_shape, data.n_outputs, seed=0)
        if mode == "plain":
            result = fit(DistributedDataParallel(net), data, train_spec(epochs=3, batch_size=32))
            torch.save({"state": net.state_dict(), "history": no_time(result.history)},
                       Path(out) / f"rank{rank}.pt")
        elif mode == "early_stop":  # rank 1 alone sees a validation split it cannot learn
            if rank == 1:
                data = replace(data, y_val=1 - data.y_val)
            result = fit(DistributedDataParallel(net), data,
                         train_spec(epochs=12, batch_size=32,
                                    early_stopping=EarlyStoppingSpec(patience=2, min_delta=0.0)))
            torch.save({"history": no_time(result.history)}, Path(out) / f"stop{rank}.pt")
        else:  # resume every rank from rank 0's checkpoint: each rank its own dropout RNG
            ckpt = load_checkpoint(Path(out) / "single.pt")
            rng: list[torch.Tensor] = []
            fit(DistributedDataParallel(net), data, train_spec(epochs=3, batch_size=32),
                checkpoint=ckpt, on_epoch=lambda m, c: rng.append(torch.get_rng_state()))
            torch.save({"rng": rng[0]}, Path(out) / f"resume{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    # Done: leave without torch's teardown. Freeing the DDP model destroys the gloo process
    # group while holding the GIL, and gloo's worker thread may still need the GIL to free the
    # last all-reduce's tensors: a deadlock seen once in a full test run (py-spy: main thread
    # in ~ProcessGroupGloo joining, worker thread in ~AsyncAllreduceWork waiting for the GIL).
    os._exit(0)


def run_ddp(out: str, mode: str = "plain") -> None:
    """Two gloo ranks, forked from a fresh interpreter (see the test)."""
    import torch.multiprocessing as mp

    # fork: the children start with torch and torch._dynamo (which DDP and the optimisers
    # import on first use) already imported; spawn re-imports them, ~10 s per child here.
    importlib.import_module("torch._dynamo")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), out, mode), nprocs=2,
                       join=True, start_method=method)


def _run_ddp_fresh(out: Path, mode: str) -> None:
    root = Path(__file__).resolve().parents[2]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from tests.trainer.test_loop import run_ddp; run_ddp(sys.argv[2], sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(root), str(out), mode], check=True,
                   timeout=600)


@pytest.mark.slow
def test_ddp_ranks_stop_early_together_on_the_mean_validation_loss(tmp_path: Path) -> None:
    _run_ddp_fresh(tmp_path, "early_stop")
    h0, h1 = (torch.load(tmp_path / f"stop{r}.pt", weights_only=True)["history"]
              for r in (0, 1))
    assert [m["val_loss"] for m in h0] == [m["val_loss"] for m in h1]  # the same mean
    assert len(h0) == len(h1) < 12  # stopped early, at the same epoch on both ranks


@pytest.mark.slow
def test_ddp_ranks_resumed_from_one_checkpoint_draw_their_own_dropout(tmp_path: Path) -> None:
    data = make_data(n=503)
    ckpts: list[Any] = []
    run(data, train_spec(epochs=1, batch_size=32), mspec=model_spec(dropout=0.3),
        on_epoch=lambda m, c: ckpts.append(c()))
    save_checkpoint(ckpts[0], tmp_path / "single.pt")
    _run_ddp_fresh(tmp_path, "resume")
    r0, r1 = (torch.load(tmp_path / f"resume{r}.pt", weights_only=True)["rng"] for r in (0, 1))
    assert not torch.equal(r0, r1)


@pytest.mark.slow
def test_ddp_two_ranks_end_with_identical_weights(tmp_path: Path) -> None:
    # The ranks are forked from a fresh interpreter: forking the test process itself, which
    # may hold a running Ray and its threads, deadlocks the children.
    _run_ddp_fresh(tmp_path, "plain")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["history"] == r1["history"]  # train_loss all-reduced, val on the full split
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    start = build_model(model_spec(), (6,), 2, seed=0).state_dict()
    assert not torch.equal(start["0.weight"], r0["state"]["0.weight"])


# --- precision, checkpoint copies, determinism (issue #16) ---------------------------------


@pytest.mark.parametrize(("capability", "native", "want"), [
    ((7, 5), False, "fp32"),    # T4: bf16 only by emulation
    ((7, 0), True, "fp32"),     # V100: even if a driver claimed it, no bf16 tensor cores
    ((8, 0), True, "bf16-autocast"),   # A100
    ((9, 0), True, "bf16-autocast"),   # H100 / H200
    ((8, 6), False, "fp32"),    # a card whose runtime says no
])
def test_bf16_only_on_cards_with_native_bf16(monkeypatch: pytest.MonkeyPatch,
                                             capability: tuple[int, int], native: bool,
                                             want: str) -> None:
    from trainer import models

    asked: list[bool] = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation)
                        or native)
    assert models.precision(torch.device("cuda", 0)) == want
    assert asked in ([], [False])  # never the emulation answer
    assert models.precision(torch.device("cpu")) == "fp32"


def test_validation_metrics_are_float32_even_when_training_uses_bf16(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Training under bf16 autocast (forced here on the CPU, which supports it), the
    validation loss in the history is the float32 loss of the model that is served."""
    from trainer import loop, models

    monkeypatch.setattr(loop, "use_bf16", lambda device: True)
    monkeypatch.setattr(models, "use_bf16", lambda device: True)
    data = make_data()
    result = run(data, train_spec(epochs=1))
    assert result.precision == "bf16-autocast"
    net = result.model.eval()
    with torch.no_grad():
        fp32 = torch.nn.functional.cross_entropy(net(data.x_val), data.y_val).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = torch.nn.functional.cross_entropy(net(data.x_val).float(), data.y_val).item()
    assert result.history[0]["val_loss"] == pytest.approx(fp32, rel=1e-6)
    assert abs(bf16 - fp32) > 1e-5  # bf16 logits would have shown


def test_the_checkpoint_is_copied_only_when_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import loop

    made: list[int] = []
    real = loop.make_checkpoint
    monkeypatch.setattr(loop, "make_checkpoint",
                        lambda *a: made.append(a[-1]["epoch"]) or real(*a))
    taken: dict[int, Any] = {}

    def on_epoch(metrics: dict[str, Any], ckpt: Any) -> None:
        if metrics["epoch"] in (2, 4):
            taken[metrics["epoch"]] = ckpt()
            assert ckpt() is taken[metrics["epoch"]]  # one copy, however often asked

    run(make_data(), train_spec(epochs=5), on_epoch=on_epoch)
    assert made == [2, 4]
    assert taken[4]["epoch"] == 4


def test_deterministic_asks_torch_for_deterministic_kernels() -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import torch; "
            "from tests.trainer.test_loop import make_data, run, train_spec; "
            "run(make_data(), train_spec(epochs=1, deterministic=True)); "
            "print(torch.are_deterministic_algorithms_enabled(), "
            "torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)")
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["True", "True", "False"]
