"""What one member of a pack has of its own (``Member``), what members must share
(``pack_key``), how a member's run ended (``MemberResult``), and when packing pays
(``pack_pays``, the rule measured by ``benchmarks/bench_pack.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.config import ModelSpec, TrainSpec


@dataclass(kw_only=True, slots=True)
class Member:
    """What one member (one trial) of a pack has of its own; defaults as ``TrainSpec``."""

    key: Any = None
    """The caller's name for the member (a trial id); reported back with its results."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    dropout: float = 0.0
    seed: int = 0
    epochs: int = 30
    patience: int | None = None
    min_delta: float = 0.0
    grad_clip: float | None = None
    lr_schedule: str = "none"
    step_size: int = 10
    gamma: float = 0.1

    @classmethod
    def from_spec(cls, model: ModelSpec, train: TrainSpec, key: Any = None) -> Member:
        """From the spec's ``model`` and ``train`` sections, as ``fit`` reads them."""
        stop = train.early_stopping
        return cls(key=key, lr=train.lr, weight_decay=train.weight_decay,
                   momentum=train.momentum, dropout=model.dropout, seed=train.seed,
                   epochs=train.epochs, grad_clip=train.grad_clip,
                   lr_schedule=train.lr_schedule, step_size=train.step_size, gamma=train.gamma,
                   patience=None if stop is None else stop.patience,
                   min_delta=0.0 if stop is None else stop.min_delta)

    def lr_at(self, epoch: int) -> float:
        """The lr of 0-based ``epoch`` (``make_scheduler``'s schedules, closed form)."""
        if self.lr_schedule == "cosine":
            return self.lr * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        if self.lr_schedule == "step":
            return self.lr * self.gamma ** (epoch // self.step_size)
        return self.lr


def pack_key(model: ModelSpec, train: TrainSpec) -> tuple[Any, ...]:
    """What members of one pack must share: trials with equal keys can be packed."""
    m, t = model, train
    return (m.kind, tuple(int(h) for h in m.hidden), m.activation, t.batch_size, t.optimizer,
            t.device, t.threads)


@dataclass
class MemberResult:
    """A member's run, as ``trainer.loop.FitResult`` reports one, plus how it ended."""

    key: Any
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    status: str
    """finished | stopped (by the caller) | diverged"""
    error: str | None
    model: nn.Module | None
    """A ``build_model`` network with the best epoch's weights (None before any epoch)."""



CPU_MAX_WIDTH = 128
CPU_MAX_WIDTH_X_BATCH = 65_536
CUDA_MAX_WIDTH_X_BATCH = 4_194_304  # not measured: see pack_pays


def pack_pays(model: ModelSpec, batch_size: int, device: str | torch.device) -> bool:
    """Whether N members of ``model`` at ``batch_size`` train faster packed than one by one.

    The rule on a CPU: pack an MLP when its widest hidden layer has at most 128 units and
    widest x batch_size <= 65,536 (e.g. [128, 64] at 512, [64] at 1024, [32] at 2048).

    Measured (``benchmarks/bench_pack.py`` and a sweep of widths x batch sizes; adult, 110
    inputs, 8 members, AdamW, no dropout, one thread, CPU time; speed-up = sequential
    ``fit`` / packed): the gain is the per-step overhead saved (launches, Python, the
    optimiser's per-tensor loop), so it falls as the work per step (width x batch) grows,
    and it falls faster for wide layers, where batched matmuls are less efficient per flop:

    ====================  =====  =====  =====  =====  ======
    hidden \\ batch          64    128    256    512   1024
    [32]                  4.4           3.0           1.8
    [64]                  3.7    3.2    2.1    1.7
    [128]                        1.9           1.2
    [128, 64]                    1.6    1.4    1.3    1.03
    [256]                 1.35          1.2    1.03
    [256, 128]                   0.96          ~1.0
    ====================  =====  =====  =====  =====  ======

    ``bench_pack.py`` (two runs, loadavg 23, 2 epochs x 3 rounds) gave 4.4 / 4.6 for [32]/64,
    3.2 / 3.3 for [64]/128 and 1.56 / 1.71 for [128, 64]/512 (the table's 1.3 is from the
    sweep, taken before the optimiser's fast path and the in-place flat gradient).

    The rule packs every cell above 1.2 with width <= 128 and none at or below 1.03; it leaves
    [256] at 64 (1.35) unpacked to stay clear of [256, 128], which does not pay.

    On CUDA (not measured here: no GPU on the build machines) each step of these models is
    launch-bound, so packing should pay up to far more work per step: pack while widest x
    batch_size <= 4,194,304 (e.g. [1024] at 4096); the GPU run of ``bench_pack.py`` is what
    should set this bound. Other devices, and CNNs: never.
    """
    cfg = model
    if cfg.kind != "mlp":
        return False
    widest = max((int(h) for h in cfg.hidden), default=0)
    kind = torch.device(device).type if isinstance(device, str) else device.type
    if kind == "cpu":
        return widest <= CPU_MAX_WIDTH and widest * batch_size <= CPU_MAX_WIDTH_X_BATCH
    if kind == "cuda":
        return widest * batch_size <= CUDA_MAX_WIDTH_X_BATCH
    return False
