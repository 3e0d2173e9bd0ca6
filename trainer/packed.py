"""Packed trials: N MLPs of one architecture trained at once as one vectorised model.

Small trials (an MLP on a table, a few dozen tiny kernels per step) are bound by kernel launch
and Python overhead, not arithmetic. A ``Pack`` holds N members' weights as the rows of one
flat ``(N, P)`` tensor; layer l of every member is a view ``(N, out, in)`` of it, so one
``baddbmm`` runs layer l for all members, one backward fills every member's gradient, and one
``PackedOptimizer`` step updates them all with each member's own lr, weight decay, momentum.

What members share: the architecture (kind mlp, hidden, activation), the batch size, the
optimiser kind, the data and the device (``pack_key``). What each member has of its own
(``Member``): lr, weight decay, momentum, dropout, seed, epochs, early-stopping patience and
min_delta, grad clip, lr schedule. Each member trains exactly as ``trainer.loop.fit`` trains
one model with the same settings: initial weights from ``build_model(..., seed)``, batch order
from ``torch.Generator().manual_seed(seed)`` (one ``randperm`` per epoch), dropout masks from
its own generator seeded with ``seed`` and drawn in fit's order (on CPU the masks are bit
for bit fit's; on CUDA fit's fused dropout kernel draws differently), the same metrics, the
same early stopping and divergence check, the best epoch's weights at the end.

A member can be stopped (``stop``: a scheduler's decision) or diverge to nan: its row is
masked out of every update (``PackedOptimizer.step(active)``) and the others are untouched;
its slot can take in a new member (``add``). Float32 only (no bf16 autocast), one process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.config import ModelSpec, TrainSpec
from trainer.loop import STOP_KEYS, TensorData, resolve_device, stop_reason
from trainer.metrics import task_metrics
from trainer.models import EVAL_BATCH, build_model
from trainer.pack_member import Member, MemberResult, pack_key, pack_pays
from trainer.packed_net import PackedMLP, from_row, to_row
from trainer.packed_optim import PackedOptimizer

OnMember = Callable[[Any, dict[str, Any]], bool | None]
"""``on_epoch(key, metrics)``; return True to stop that member (a scheduler's decision)."""


@dataclass
class _Slot:
    member: Member
    gen: torch.Generator  # batch order, as fit's
    drop_gen: torch.Generator  # dropout masks, as fit's global RNG
    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_row: torch.Tensor | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    status: str = "running"
    error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


_RESUMED = ("epoch", "best_val_loss", "best_epoch", "bad_epochs", "stopped_early", "history")


class Pack:
    """Up to ``size`` members of one MLP architecture, trained epoch by epoch together."""

    def __init__(self, model: ModelSpec, data: TensorData, *, size: int, batch_size: int,
                 optimizer: str = "adamw", device: str | torch.device = "cpu") -> None:
        self.model_cfg = model
        if model.kind != "mlp":
            raise ValueError(f"model.kind: packing trains MLPs only, got {self.model_cfg.kind!r}")
        if size < 1 or batch_size < 1:
            raise ValueError(f"pack: size and batch_size must be >= 1, got {size}, {batch_size}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.data, self.size, self.batch_size = data.to(self.device), size, batch_size
        flat = [getattr(self.data, s).reshape(len(getattr(self.data, s)), -1)
                for s in ("x_train", "x_val")]
        self.x_train, self.x_val = flat
        widths = [self.x_train.shape[1], *(int(h) for h in self.model_cfg.hidden),
                  data.n_outputs]
        self.net = PackedMLP(widths, self.model_cfg.activation, size, self.device, data.task)
        self.flat, self.grad = self.net.flat, self.net.grad
        self.opt = PackedOptimizer(self.flat, optimizer)
        self.slots: list[_Slot | None] = [None] * size
        self.active = torch.zeros(size, dtype=torch.bool, device=self.device)

    # --- members ------------------------------------------------------------------------

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None or s.status != "running"]

    def running(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None and s.status == "running"]

    def add(self, member: Member, checkpoint: dict[str, Any] | None = None) -> int:
        """Put ``member`` into a free slot: fresh (weights from ``build_model``, optimiser
        state zero, RNGs seeded), or where ``checkpoint`` (from ``checkpoint``) left it."""
        free = self.free_slots()
        if not free:
            raise RuntimeError(f"pack: all {self.size} slots are running; stop one first")
        if member.epochs < 1:
            raise ValueError(f"train.epochs: must be >= 1, got {member.epochs}")
        slot = free[0]
        net = build_model(self.model_cfg.model_copy(update={"dropout": member.dropout}),
                          self.data.input_shape, self.data.n_outputs, seed=member.seed)
        with torch.no_grad():
            self.flat[slot] = to_row(net).to(self.device)
        self.opt.set_member(slot, member.lr, member.weight_decay, member.momentum)
        drop_gen = torch.Generator(self.device).manual_seed(member.seed)
        self.slots[slot] = s = _Slot(member, torch.Generator().manual_seed(member.seed),
                                     drop_gen)
        self.active[slot] = True
        if checkpoint is not None:
            self._restore(slot, s, checkpoint)
        return slot

    def checkpoint(self, slot: int) -> dict[str, Any]:
        """One member's state after its last epoch (weights, optimiser rows, both RNGs, early
        stopping, history), on the CPU: ``add(member, checkpoint)`` resumes it in any pack."""
        s = self._slot(slot)
        best = None if s.best_row is None else s.best_row.cpu().clone()
        return {"row": self.flat[slot].detach().cpu().clone(),
                "opt": self.opt.member_state(slot), "gen": s.gen.get_state(),
                "drop_gen": s.drop_gen.get_state().cpu(), "best_row": best,
                **{k: getattr(s, k) for k in _RESUMED if k != "history"},
                "history": [dict(h) for h in s.history]}

    def _restore(self, slot: int, s: _Slot, ckpt: dict[str, Any]) -> None:
        with torch.no_grad():
            self.flat[slot] = ckpt["row"].to(self.device)
        self.opt.load_member_state(slot, ckpt["opt"])
        s.gen.set_state(ckpt["gen"])
        s.drop_gen.set_state(ckpt["drop_gen"])
        s.best_row = None if ckpt["best_row"] is None else ckpt["best_row"].to(self.device)
        for key in _RESUMED:
            setattr(s, key, ckpt[key])
        s.history = [dict(h) for h in ckpt["history"]]
        if s.stopped_early or s.epoch >= s.member.epochs:
            self.stop(slot, "finished")

    def stop(self, slot: int, status: str = "stopped") -> None:
        """Mask ``slot`` out of training (a scheduler stopped it); its slot becomes free."""
        s = self._slot(slot)
        if s.status == "running":
            s.status = status
        self.active[slot] = False

    def result(self, slot: int) -> MemberResult:
        """The member in ``slot`` (until the slot takes a new one), best weights loaded."""
        s = self._slot(slot)
        net = None
        if s.best_row is not None:
            net = build_model(self.model_cfg.model_copy(update={"dropout": s.member.dropout}),
                              self.data.input_shape, self.data.n_outputs, seed=s.member.seed)
            from_row(net, s.best_row)
        return MemberResult(key=s.member.key, history=list(s.history), best_epoch=s.best_epoch,
                            best_val_loss=s.best_val_loss, epochs_run=s.epoch,
                            stopped_early=s.stopped_early, status=s.status, error=s.error,
                            model=net)

    def _slot(self, slot: int) -> _Slot:
        s = self.slots[slot]
        if s is None:
            raise KeyError(f"pack: slot {slot} holds no member")
        return s

    # --- training -----------------------------------------------------------------------

    def run_epoch(self) -> list[tuple[int, dict[str, Any]]]:
        """One epoch for every running member: ``(slot, metrics)`` each, with fit's keys
        (epoch, train_loss, val_loss, val_accuracy | val_rmse, lr, epoch_time_s; the time is
        the pack's epoch shared out among its members). A member that finished, stopped early
        or diverged in this epoch has left the running set when this returns."""
        live = self.running()
        if not live:
            return []
        t0 = time.perf_counter()
        lrs = [self._slot(i).member.lr_at(self._slot(i).epoch) if i in live else 0.0
               for i in range(self.size)]
        self.opt.set_lr(torch.tensor(lrs, dtype=torch.float64, device=self.device))
        n = len(self.x_train)
        orders = torch.stack([torch.randperm(n, generator=self._slot(i).gen) if i in live
                              else torch.arange(n) for i in range(self.size)]).to(self.device)
        train_loss = self._train_epoch(orders).tolist()
        with torch.no_grad():  # in chunks, as forward_batched: (N, chunk, H) stays small
            val_out = torch.cat([self.net.forward(self.x_val[i:i + EVAL_BATCH], None)
                                 for i in range(0, len(self.x_val), EVAL_BATCH)], dim=1)
        share = (time.perf_counter() - t0) / len(live)
        reports = []
        for i in live:
            metrics = {"epoch": self._slot(i).epoch + 1, "train_loss": train_loss[i],
                       **task_metrics(val_out[i], self.data.y_val, self.data.task,
                                      self.data.y_mean, self.data.y_scale, "val_", False),
                       "lr": lrs[i], "epoch_time_s": share}
            self._end_epoch(i, metrics)
            reports.append((i, metrics))
        return reports

    def _end_epoch(self, i: int, metrics: dict[str, Any]) -> None:
        """fit's bookkeeping: divergence check, best epoch (Keras min_delta), early stop."""
        s = self._slot(i)
        s.epoch = metrics["epoch"]
        s.history.append(dict(metrics))
        for name in ("train_loss", "val_loss"):
            if not math.isfinite(metrics[name]):
                s.error = (f"train.lr: loss became {metrics[name]} at epoch {s.epoch} "
                           f"(lr={metrics['lr']:g}); lower train.lr or set train.grad_clip")
                self.stop(i, "diverged")
                return
        m = s.member
        if metrics["val_loss"] < s.best_val_loss - m.min_delta:
            s.best_val_loss, s.best_epoch, s.bad_epochs = metrics["val_loss"], s.epoch, 0
            s.best_row = self.flat[i].detach().clone()
        else:
            s.bad_epochs += 1
        s.stopped_early = m.patience is not None and s.bad_epochs >= m.patience
        if s.stopped_early:  # fit's stop keys and sentence, so a tracker tags it as fit's
            assert m.patience is not None
            reason = stop_reason(s.best_val_loss, s.best_epoch, m.min_delta, m.patience)
            metrics.update(zip(STOP_KEYS, (1, reason), strict=True))
            s.history[-1] = dict(metrics)
        if s.stopped_early or s.epoch >= m.epochs:
            self.stop(i, "finished")

    def _train_epoch(self, orders: torch.Tensor) -> torch.Tensor:
        """One pass of every member over its own order ``(N, n)``; mean losses ``(N,)``."""
        x, y, bs = self.x_train, self.data.y_train, self.batch_size
        clip = [s.member.grad_clip if s is not None and s.member.grad_clip is not None
                else math.inf for s in self.slots]
        clip_t = torch.tensor(clip, device=self.device) if any(map(math.isfinite, clip)) else None
        total = torch.zeros(self.size, device=self.device)
        all_active = len(self.running()) == self.size
        for start in range(0, orders.shape[1], bs):
            idx = orders[:, start:start + bs]  # (N, B)
            flat_idx = idx.reshape(-1)
            xb = x.index_select(0, flat_idx).view(*idx.shape, -1)  # (N, B, F)
            out = self.net.forward(xb, self._masks(idx.shape[1]))
            loss = self.net.loss(out, y.index_select(0, flat_idx).view(idx.shape))  # (N,)
            self.net.backward(loss, clip_t)
            self.opt.step(None if all_active else self.active)
            total += loss.detach() * idx.shape[1]
        return total / orders.shape[1]

    def _masks(self, batch: int) -> list[torch.Tensor] | None:
        drops = [s.member.dropout if s is not None and s.status == "running" else 0.0
                 for s in self.slots]
        gens = [None if s is None else s.drop_gen for s in self.slots]
        return self.net.masks(drops, gens, batch)


def fit_packed(model: ModelSpec, data: TensorData, members: list[Member], train: TrainSpec, *,
               size: int | None = None, on_epoch: OnMember | None = None) -> list[MemberResult]:
    """Train ``members`` (``size`` at a time, default all) and return their results in order.

    ``train`` gives what members share (batch_size, optimizer, device, threads); a member that
    ends frees its slot for the next one waiting. ``on_epoch(key, metrics)`` returning True
    stops that member, as a Tune scheduler would."""
    if torch.get_num_threads() != train.threads:
        torch.set_num_threads(train.threads)
    pack = Pack(model, data, size=size or len(members), batch_size=train.batch_size,
                optimizer=train.optimizer, device=train.device)
    waiting = list(enumerate(members))
    results: list[MemberResult | None] = [None] * len(members)
    index: dict[int, int] = {}
    while waiting or pack.running():
        for slot in pack.free_slots():
            if waiting and slot not in index:
                index[slot], member = waiting.pop(0)
                pack.add(member)
        for slot, metrics in pack.run_epoch():
            if on_epoch is not None and on_epoch(pack._slot(slot).member.key, dict(metrics)):
                pack.stop(slot)
        for slot in pack.free_slots():
            if slot in index:
                results[index.pop(slot)] = pack.result(slot)
    done = [r for r in results if r is not None]
    assert len(done) == len(members), "fit_packed: a member left without a result"
    return done


__all__ = ["Member", "MemberResult", "Pack", "fit_packed", "pack_key", "pack_pays"]

