"""One training run: in-memory tensors, a seeded mini-batch loop, early stopping, resume.

Read top to bottom: ``TensorData`` (the three splits as tensors) -> ``train_step`` (one
optimiser step, a pure function of model, batch and optimiser) -> ``fit`` (epochs; reports
each one to a callback; side effects belong to the caller) -> ``evaluate`` / ``predict``.

Mini-batches are shuffled index slices of tensors that already live on the device; a
``DataLoader`` would fetch rows one by one, 10-100x slower for tables. ``fit`` takes the
spec's ``train`` section (``trainer.config.TrainSpec``) and never imports Ray or MLflow.

Distributed data parallel: when ``torch.distributed`` is initialised, the caller wraps the
model in ``DistributedDataParallel`` (as Ray Train's ``prepare_model`` does) and calls
``fit`` on every rank. Each rank trains on ``perm[rank::world]`` of the same seeded
permutation, trimmed so every rank takes the same number of steps (else DDP hangs); the
train loss is averaged over ranks; validation runs on the full split on every rank and its
loss is averaged over ranks before early stopping decides, so every rank stops at the same
epoch (a rank that stopped alone would hang the others in their next all-reduce).

Precision: bf16 autocast in training on CUDA cards with native bf16 (``models.use_bf16``),
float32 elsewhere; validation and test metrics are always computed in float32, as the served
model predicts. ``train.deterministic`` asks torch for deterministic kernels (cuDNN, cuBLAS).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.arrays import Shapes
from trainer.checkpoint import copy_tensors, make_checkpoint, restore_checkpoint
from trainer.config import TASKS, EarlyStoppingSpec, TrainSpec
from trainer.errors import RungwiseError
from trainer.metrics import LossFn, evaluate, loss_function
from trainer.models import (
    autocast_context,
    param_device,
    precision,
    predict,
    predict_proba,
    unwrap,
    use_bf16,
)

__all__ = ["DeviceError", "DivergedError", "FitResult", "TensorData", "evaluate",
           "fit", "make_optimizer", "make_scheduler", "predict", "predict_proba",
           "resolve_device", "train_step"]

Checkpoint = Callable[[], dict[str, Any]]
"""Makes the checkpoint of the epoch just finished; call it inside ``on_epoch`` or not at all."""
OnEpoch = Callable[[dict[str, Any], Checkpoint | None], None]
STOP_KEYS = ("stopped_early", "stop_reason")
"""Keys of the epoch's metrics at which early stopping ended the run (absent before)."""
_SPLITS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


class DivergedError(RungwiseError, RuntimeError):
    """The loss became nan or inf; the one-line message names ``train.lr``."""


class DeviceError(RungwiseError):
    """``train.device`` names a device this machine does not have (a user error: exit 2)."""


@dataclass
class TensorData(Shapes):
    """Train/val/test torch tensors that ``fit`` trains on, made in the trial (from_prepared).

    x float32; y int64 (classes) or float32 (standardised)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str
    n_classes: int
    """Number of classes; 0 for regression."""
    y_mean: float = 0.0
    y_scale: float = 1.0
    """Regression: original target = standardised * y_scale + y_mean."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"data.task: unknown task {self.task!r}; "
                             f"allowed: {', '.join(TASKS)}")
        if self.task == "classification" and self.n_classes < 2:
            raise ValueError(f"data.target: classification needs >= 2 classes, "
                             f"got {self.n_classes}")
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y) or len(x) == 0:
                raise ValueError(f"data: the {split} split has {len(x)} rows of x and "
                                 f"{len(y)} of y; need the same, non-zero")

    @classmethod
    def from_numpy(cls, x_train: Any, y_train: Any, x_val: Any, y_val: Any, x_test: Any,
                   y_test: Any, task: str, n_classes: int | None = None,
                   y_mean: float = 0.0, y_scale: float = 1.0) -> TensorData:
        """Arrays -> tensors; ``n_classes`` defaults to ``max(y) + 1`` for classification."""
        y_dtype = torch.int64 if task == "classification" else torch.float32
        xs = [torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in (x_train, x_val, x_test)]
        ys = [torch.as_tensor(np.asarray(a)).to(y_dtype).reshape(-1)
              for a in (y_train, y_val, y_test)]
        if task != "classification":
            n_classes = 0
        elif n_classes is None:
            n_classes = int(max(int(y.max()) for y in ys)) + 1
        return cls(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], task=task, n_classes=n_classes,
                   y_mean=float(y_mean), y_scale=float(y_scale))

    @classmethod
    def from_prepared(cls, prepared: Any) -> TensorData:
        """From any object with the same attributes (``trainer.arrays.ArrayData``,
        ``trainer.pipeline.Prepared``)."""
        arrays = {name: getattr(prepared, name) for name in _SPLITS}
        return cls.from_numpy(**arrays, task=prepared.task, n_classes=prepared.n_classes,
                              y_mean=prepared.y_mean, y_scale=prepared.y_scale)

    def to(self, device: torch.device | str) -> TensorData:
        return replace(self, **{name: getattr(self, name).to(device) for name in _SPLITS})


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    model: nn.Module
    """The model passed in, with the best epoch's weights loaded."""
    precision: str = "fp32"
    """``bf16-autocast`` or ``fp32``: what the training steps used."""


@dataclass
class _State:
    """Everything besides model/optimiser/scheduler/RNG that a resumed run needs."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def train_step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, loss_fn: LossFn,
               optimizer: torch.optim.Optimizer, grad_clip: float | None = None,
               autocast: bool = False) -> torch.Tensor:
    """One optimiser step on one batch; returns the batch's mean loss, detached.

    The loss stays a tensor so the loop does not wait for the device once per batch;
    call ``float()`` on it when a number is needed.
    """
    with autocast_context(xb.device, autocast):
        loss = loss_fn(model(xb), yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def fit(model: nn.Module, data: TensorData, train: TrainSpec, on_epoch: OnEpoch | None = None,
        checkpoint: dict[str, Any] | None = None, checkpoint_every: int = 1,
        until_epoch: int | None = None) -> FitResult:
    """Train ``model`` on ``data.*_train``, validating on ``data.*_val`` after each epoch.

    ``on_epoch(metrics, ckpt)`` is called once per epoch with ``metrics`` = epoch (1-based),
    train_loss, val_loss, val_accuracy | val_rmse, lr, epoch_time_s, and ``ckpt`` every
    ``checkpoint_every`` epochs (0 = never), else None: a function that returns the epoch's
    checkpoint as a plain dict (see ``checkpoint.save_checkpoint``), so that the copy off
    the device is made only when the caller decides to save. Pass such a dict as
    ``checkpoint`` to resume exactly where it was taken.
    Early stopping watches val_loss and is decided here only: the epoch at which patience
    runs out reports ``stopped_early=1`` and a ``stop_reason`` sentence in its metrics (and
    ``FitResult.stopped_early``). The best epoch's weights are restored at the end.
    ``until_epoch`` stops before ``train.epochs`` (a checkpoint already there trains no more:
    its best weights are loaded, which is how a finished trial's model is rebuilt).
    """
    if torch.get_num_threads() != train.threads:
        torch.set_num_threads(train.threads)
    if train.deterministic:
        set_deterministic()
    rank, world = _rank_world(model)
    wrapped = isinstance(model, DistributedDataParallel)
    device = param_device(model) if wrapped else resolve_device(train.device)
    model.to(device)
    data = data.to(device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # dropout draws from a seeded, private RNG
        torch.manual_seed(train.seed + rank)
        return _fit(model, data, train, on_epoch, checkpoint, checkpoint_every, rank, world,
                    train.epochs if until_epoch is None else min(until_epoch, train.epochs))


def _fit(model: nn.Module, data: TensorData, cfg: TrainSpec, on_epoch: OnEpoch | None,
         checkpoint: dict[str, Any] | None, checkpoint_every: int, rank: int,
         world: int, epochs: int) -> FitResult:
    net, device = unwrap(model), data.x_train.device
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_scheduler(opt, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)  # the shuffle order, the same on every rank
    state = _State()
    if checkpoint is not None:
        state = _State(**restore_checkpoint(checkpoint, net, opt, sched, gen))
        if rank > 0:  # the checkpoint holds rank 0's RNG: give this rank its own dropout masks
            torch.manual_seed(_rank_seed(cfg.seed, rank, state.epoch))
    loss_fn, autocast = loss_function(data.task), use_bf16(device)
    while state.epoch < epochs and not state.stopped_early:
        t0, lr = time.perf_counter(), opt.param_groups[0]["lr"]
        order = _shard(torch.randperm(len(data.x_train), generator=gen), rank, world)
        train_loss = _train_epoch(model, data, order.to(device), cfg, opt, loss_fn, autocast)
        state.epoch += 1
        _check_finite(train_loss, state.epoch, lr)
        val = evaluate(net, data.x_val, data.y_val, data, prefix="val_", extended=False)
        val["val_loss"] = _mean_over_ranks(val["val_loss"], device, world)
        _check_finite(val["val_loss"], state.epoch, lr)
        if sched is not None:
            sched.step()
        _update_best(state, val["val_loss"], net, cfg.early_stopping)
        metrics = {"epoch": state.epoch, "train_loss": train_loss, **val, "lr": lr,
                   "epoch_time_s": time.perf_counter() - t0}
        if state.stopped_early:
            metrics.update(zip(STOP_KEYS, (1, _stop_reason(cfg.early_stopping, state)),
                               strict=True))
        state.history.append(metrics)
        if on_epoch is not None:
            due = checkpoint_every > 0 and state.epoch % checkpoint_every == 0
            snap = _snapshot(net, opt, sched, gen, state) if due else None
            on_epoch(dict(metrics), snap)
    net.load_state_dict(state.best_state)
    return FitResult(history=state.history, best_epoch=state.best_epoch,
                     best_val_loss=state.best_val_loss, epochs_run=state.epoch,
                     stopped_early=state.stopped_early, model=model,
                     precision=precision(device))


def _snapshot(net: nn.Module, opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator,
              state: _State) -> Checkpoint:
    """The checkpoint of this epoch, copied off the device only if asked for (once)."""
    made: list[dict[str, Any]] = []
    epoch = state.epoch

    def take() -> dict[str, Any]:
        if state.epoch != epoch:
            raise RuntimeError("fit: a checkpoint must be taken inside on_epoch, during its epoch")
        if not made:
            made.append(make_checkpoint(net, opt, sched, gen, vars(state)))
        return made[0]

    return take


def _mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    """The mean of ``value`` over DDP ranks (each rank validates on the same full split, but
    non-deterministic kernels can make their losses differ in the last bits)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world


def _rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed of its own per (seed, rank, epoch), for ranks resumed from rank 0's checkpoint."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def set_deterministic() -> None:
    """Deterministic kernels (``train.deterministic: true``): cuDNN without autotuning and
    torch's deterministic algorithms; cuBLAS needs its workspace setting before CUDA starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def _train_epoch(model: nn.Module, data: TensorData, order: torch.Tensor, cfg: TrainSpec,
                 opt: torch.optim.Optimizer, loss_fn: LossFn, autocast: bool) -> float:
    """One pass over ``order``; the mean loss weighted by batch size (over all ranks)."""
    model.train()
    x, y, bs = data.x_train, data.y_train, cfg.batch_size
    total = torch.zeros((), device=x.device)
    for start in range(0, len(order), bs):
        idx = order[start:start + bs]
        total += train_step(model, x[idx], y[idx], loss_fn, opt, cfg.grad_clip, autocast) * len(idx)
    sums = torch.stack([total, torch.tensor(float(len(order)), device=x.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def _shard(perm: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of the permutation; equal lengths on all ranks (remainder dropped)."""
    if world == 1:
        return perm
    usable = len(perm) - len(perm) % world
    if usable == 0:
        raise ValueError(f"data: {len(perm)} training rows cannot be shared by {world} workers")
    return perm[:usable][rank::world]


def _check_finite(loss: float, epoch: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise DivergedError(f"train.lr: loss became {loss} at epoch {epoch} (lr={lr:g}); "
                            "lower train.lr or set train.grad_clip")


def _update_best(state: _State, val_loss: float, net: nn.Module,
                 early_stopping: EarlyStoppingSpec | None) -> None:
    """Keras semantics: an improvement beats the best so far by more than ``min_delta``."""
    min_delta = early_stopping.min_delta if early_stopping is not None else 0.0
    if val_loss < state.best_val_loss - min_delta:
        state.best_val_loss, state.best_epoch, state.bad_epochs = val_loss, state.epoch, 0
        state.best_state = copy_tensors(net.state_dict())
    else:
        state.bad_epochs += 1
    if early_stopping is not None and state.bad_epochs >= early_stopping.patience:
        state.stopped_early = True


def _stop_reason(early_stopping: Any, state: _State) -> str:
    return stop_reason(state.best_val_loss, state.best_epoch,
                       float(getattr(early_stopping, "min_delta", 0.0) or 0.0),
                       int(early_stopping.patience))


def stop_reason(best_val_loss: float, best_epoch: int, min_delta: float, patience: int) -> str:
    """The sentence an early-stopped run reports (``fit`` and packed members alike)."""
    return (f"train.early_stopping: val_loss did not improve on {best_val_loss:.6g} "
            f"(epoch {best_epoch}) by more than {min_delta:g} for {patience} epochs")


def make_optimizer(params: Any, cfg: TrainSpec) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainSpec) -> Any:
    """Stepped once per epoch; None for ``lr_schedule: none``."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device: cuda, but torch.cuda.is_available() is False here; "
                          "use auto or cpu")
    return torch.device(name)


def _rank_world(model: nn.Module) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0, 1
    if not isinstance(model, DistributedDataParallel):
        raise ValueError(f"fit: torch.distributed runs {dist.get_world_size()} processes but the "
                         "model is not wrapped in DistributedDataParallel; wrap it first")
    return dist.get_rank(), dist.get_world_size()
