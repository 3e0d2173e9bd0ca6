"""One optimiser step for N models at once, with hyperparameters of their own.

PyTorch's stock optimisers take one learning rate per parameter group; a pack trains N
members (``trainer.packed``) whose parameters are the rows of one flat ``(N, P)`` tensor, and
each member has its own lr, weight decay and momentum. ``PackedOptimizer`` runs SGD (with
momentum), Adam or AdamW on that tensor in a handful of whole-tensor operations, with the
per-member values as ``(N, 1)`` columns, and leaves the rows of inactive members untouched
(weights and state), so a member that diverged to nan cannot reach the others.

The arithmetic follows ``torch.optim``'s single-tensor implementations operation by operation
(scalar hyperparameters computed in float64, as Python floats are there, then applied in the
parameter's dtype); ``tests/trainer/test_packed_optim.py`` checks each member against
``torch.optim`` on the same gradients.
"""

from __future__ import annotations

from typing import Any

import torch

KINDS = ("sgd", "adam", "adamw")
BETAS = (0.9, 0.999)
EPS = 1e-8


class PackedOptimizer:
    """SGD / Adam / AdamW over ``param`` of shape ``(N, P)``: one row per member.

    ``lr``, ``weight_decay``, ``momentum`` are float64 tensors ``(N,)``; set a row with
    ``set_member`` (which also clears that row's state, for a member that takes a free slot).
    ``momentum`` is used by SGD only, as in ``trainer.loop.make_optimizer``; Adam and AdamW use
    torch's default betas (0.9, 0.999) and eps 1e-8.
    """

    def __init__(self, param: torch.Tensor, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"train.optimizer: unknown value {kind!r}; "
                             f"allowed: {', '.join(KINDS)}")
        if param.dim() != 2:
            raise ValueError(f"PackedOptimizer: param must be (members, P), "
                             f"got {tuple(param.shape)}")
        n = param.shape[0]
        self.param, self.kind = param, kind
        f64, dev = torch.float64, param.device
        self.lr = torch.zeros(n, dtype=f64, device=dev)
        self.weight_decay = torch.zeros(n, dtype=f64, device=dev)
        self.momentum = torch.zeros(n, dtype=f64, device=dev)
        self.steps = torch.zeros(n, dtype=f64, device=dev)
        self.buf = torch.zeros_like(param)  # SGD momentum / Adam first moment
        self.sq = torch.zeros_like(param) if kind != "sgd" else None  # Adam second moment

    def set_member(self, slot: int, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.0) -> None:
        """Hyperparameters of ``slot``, and fresh state for it (step 0, zero moments)."""
        self.lr[slot], self.weight_decay[slot], self.momentum[slot] = lr, weight_decay, momentum
        self.steps[slot] = 0
        self.buf[slot] = 0
        if self.sq is not None:
            self.sq[slot] = 0

    def set_lr(self, lr: torch.Tensor) -> None:
        """Per-member learning rates ``(N,)`` (an lr schedule, stepped by the caller)."""
        self.lr.copy_(lr)

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        """Update the rows where ``active`` (bool ``(N,)``; None: all rows) from ``param.grad``.

        Rows left out keep their weights and state exactly (``torch.where``, so a nan in
        their gradient goes nowhere)."""
        grad = self.param.grad
        if grad is None:
            raise RuntimeError("PackedOptimizer.step: param has no grad; call backward() first")
        self.steps += 1 if active is None else active.to(torch.float64)
        new_p, new_buf, new_sq = (self._sgd(grad) if self.kind == "sgd" else self._adam(grad))
        keep = None if active is None else active.unsqueeze(1)  # (N, 1)
        for old, new in ((self.param, new_p), (self.buf, new_buf), (self.sq, new_sq)):
            if old is not None and new is not None:
                old.copy_(new if keep is None else torch.where(keep, new, old))

    def _col(self, values: torch.Tensor) -> torch.Tensor:
        """A float64 ``(N,)`` hyperparameter as an ``(N, 1)`` column in the param's dtype."""
        return values.to(self.param.dtype).unsqueeze(1)

    def _sgd(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """torch.optim.SGD (dampening 0, no nesterov): buf = m * buf + g; p -= lr * buf.

        The first step's buf is g itself (buf starts at zero), as torch's clone of g."""
        p = self.param
        g = grad + self._col(self.weight_decay) * p
        buf = self.buf * self._col(self.momentum) + g
        return p - self._col(self.lr) * buf, buf, None

    def _adam(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """torch.optim.Adam / AdamW (amsgrad off), per-member step counts."""
        assert self.sq is not None
        beta1, beta2 = BETAS
        p, g = self.param, grad
        if self.kind == "adamw":
            p = p * self._col(1 - self.lr * self.weight_decay)
        else:
            g = g + self._col(self.weight_decay) * p
        m = self.buf.lerp(g, 1 - beta1)
        v = self.sq * beta2 + g * g * (1 - beta2)
        steps = self.steps.clamp(min=1)  # inactive rows at step 0 are discarded anyway
        step_size = self.lr / (1 - beta1 ** steps)  # float64, as torch's Python floats
        bc2_sqrt = (1 - beta2 ** steps).sqrt()
        denom = v.sqrt() / self._col(bc2_sqrt) + EPS
        return p + self._col(-step_size) * m / denom, m, v

    def member_state(self, slot: int) -> dict[str, torch.Tensor]:
        """``slot``'s row of the state (a member's own checkpoint), copied to the CPU."""
        rows = {"lr": self.lr, "weight_decay": self.weight_decay, "momentum": self.momentum,
                "steps": self.steps, "buf": self.buf, "sq": self.sq}
        return {k: v[slot].detach().cpu().clone() for k, v in rows.items() if v is not None}

    def load_member_state(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            row = getattr(self, key)
            if row is not None:
                row[slot] = value.to(row.device)

    def state_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "lr": self.lr, "weight_decay": self.weight_decay,
               "momentum": self.momentum, "steps": self.steps, "buf": self.buf}
        if self.sq is not None:
            out["sq"] = self.sq
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"PackedOptimizer: state is for {state.get('kind')!r}, "
                             f"this optimiser is {self.kind!r}")
        for key in ("lr", "weight_decay", "momentum", "steps", "buf", "sq"):
            if key in state and getattr(self, key) is not None:
                getattr(self, key).copy_(state[key])
