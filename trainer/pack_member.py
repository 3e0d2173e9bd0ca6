"""What one member of a pack has of its own (``Member``), what members must share
(``pack_key``), how a member's run ended (``MemberResult``), and when packing pays
(``pack_pays``, the rule measured by ``benchmarks/bench_pack.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.loop import TrainConfig
from trainer.models import ModelConfig


@dataclass(kw_only=True, slots=True)
class Member:
    """What one member (one trial) of a pack has of its own; defaults as ``TrainConfig``."""

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
    def from_spec(cls, model: Any, train: Any, key: Any = None) -> Member:
        """From the spec's ``model`` and ``train`` sections (duck-typed, as ``fit`` reads them)."""
        cfg, stop = TrainConfig.from_spec(train), getattr(train, "early_stopping", None)
        return cls(key=key, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                   dropout=ModelConfig.from_spec(model).dropout, seed=cfg.seed,
                   epochs=cfg.epochs, grad_clip=cfg.grad_clip, lr_schedule=cfg.lr_schedule,
                   step_size=cfg.step_size, gamma=cfg.gamma,
                   patience=None if stop is None else int(stop.patience),
                   min_delta=float(getattr(stop, "min_delta", 0.0) or 0.0))

    def lr_at(self, epoch: int) -> float:
        """The lr of 0-based ``epoch`` (``make_scheduler``'s schedules, closed form)."""
        if self.lr_schedule == "cosine":
            return self.lr * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        if self.lr_schedule == "step":
            return self.lr * self.gamma ** (epoch // self.step_size)
        return self.lr


def pack_key(model: Any, train: Any) -> tuple[Any, ...]:
    """What members of one pack must share: trials with equal keys can be packed."""
    m, t = ModelConfig.from_spec(model), TrainConfig.from_spec(train)
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


def pack_pays(model: Any, batch_size: int, device: str | torch.device) -> bool:
    """Provisional."""
    return True
