"""The Ray side of packed trials: ``PackServer`` trains one ``trainer.packed.Pack``, and
``PackRegistry`` tells each trial which pack to join.

A ``PackServer`` is a threaded Ray actor that holds the real resources (a CPU, or a GPU) of
one worker, the data (from the object store, as a trial gets it) and one ``Pack`` of up to N
members of one architecture. Each member is a Tune trial whose function (the relay,
tuning/relay.py) holds almost nothing and calls ``next(trial_id)``, which blocks until that
member's next epoch. Training is lock-step: an epoch of every running member starts only
when each of them is waiting for it, that is, when Tune has taken the member's last result
and let it go on (a function trainable's ``tune.report`` returns only then). A member that
Tune stops never asks again; the driver's ``PackLeaver`` callback then calls ``release`` and
its row is masked out. A member that diverges is masked out by the ``Pack`` itself.

The ``PackRegistry`` (one per sweep, created by the driver with no resources) owns the pack
actors, so they die with the driver; it assigns each trial a pack of its key (what members
must share: ``pack_key`` and the data variant) with a free place, starts a new pack when none
has one, and keeps a pack whose members all left, idle, for the next trials of its key; an
idle pack is killed when a pack waits for resources (a new one, or one not yet placed), and
every pack when the sweep ends (``close``).
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

from trainer.checkpoint import check_plain, load_checkpoint
from trainer.loop import TensorData, make_optimizer, make_scheduler, resolve_device
from trainer.models import build_model, precision
from trainer.pack_member import Member, pack_key
from trainer.packed import Pack
from trainer.packed_net import from_row
from tuning.config import SweepSpec
from tuning.resources import cap_gpu_memory
from tuning.space import variant_key
from tuning.trainable import (
    CKPT_FILE,
    DRIVER_CPU,
    Shared,
    _should_save,
    diverged_metrics,
    get_prepared,
    trial_spec,
)

PACK_FILE = "pack.pt"
"""Beside ``CKPT_FILE`` in a packed trial's checkpoint: the member's pack checkpoint."""
GATHER_S = 2.0
"""How long a pack with free places waits after a member joined before its next epoch, so
that the trials Tune starts one after another train together from their first epoch."""


class PackServer:
    """One pack of members (Tune trials) of one architecture, trained epoch by epoch."""

    def __init__(self, shared: Shared, config: dict[str, Any], size: int) -> None:
        spec, overrides = trial_spec(shared, config)
        torch.set_num_threads(spec.train.threads)
        device = resolve_device(spec.train.device)
        cap_gpu_memory(float(spec.resources.gpus_per_worker), device)
        data = TensorData.from_prepared(get_prepared(shared, spec, overrides))
        self.shared, self.precision = shared, precision(device)
        self.pack = Pack(spec.model, data, size=size, batch_size=spec.train.batch_size,
                         optimizer=spec.train.optimizer, device=device)
        self.cond = threading.Condition()
        self.slots: dict[str, int] = {}  # trial id -> slot
        self.specs: dict[str, Any] = {}
        self.waiting: set[str] = set()
        self.results: dict[str, dict[str, Any]] = {}
        self.best: dict[str, list[float]] = {}
        self.last_join = 0.0

    def join(self, tid: str, config: dict[str, Any], files: dict[str, bytes] | None) -> int:
        """Take the trial in, fresh or from its checkpoint's files (``PACK_FILE``)."""
        spec, _ = trial_spec(self.shared, config)
        resume = _load(files[PACK_FILE]) if files and PACK_FILE in files else None
        with self.cond:
            self._leave(tid)  # a retried trial comes back under the same id
            slot = self.pack.add(Member.from_spec(spec.model, spec.train, key=tid), resume)
            for other in [t for t, s in self.slots.items() if s == slot]:
                # the slot's last member had ended (its last result, if not yet taken, stays
                # in ``results``): its late ``leave`` must not stop the member that took it
                self.slots.pop(other)
                self.specs.pop(other, None)
                self.best.pop(other, None)
            self.slots[tid], self.specs[tid], self.best[tid] = slot, spec, [float("inf")]
            if resume is not None and resume["history"]:
                self.best[tid][0] = min(h["val_loss"] for h in resume["history"])
            if slot not in self.pack.running():  # resumed from its last epoch: nothing to do
                self.results[tid] = {"metrics": None, "files": None, "done": True}
            self.last_join = time.monotonic()
            self.cond.notify_all()
            return slot

    def next(self, tid: str) -> dict[str, Any]:
        """The member's next epoch: the metrics to report, the checkpoint files when due
        (``CKPT_FILE`` in ``fit``'s format, to rebuild the model; ``PACK_FILE``, to resume
        the member), and whether it was its last."""
        with self.cond:
            self.waiting.add(tid)
            try:
                while tid not in self.results:
                    if tid not in self.slots:
                        raise RuntimeError(f"pack: trial {tid} is not in this pack")
                    if self.slots[tid] not in self.pack.running():  # would wait forever
                        raise RuntimeError(f"pack: trial {tid} was stopped in its pack")
                    wait = self._wait_s()
                    if wait == 0.0:
                        self._epoch()
                    else:
                        self.cond.wait(timeout=wait)
                return self.results.pop(tid)
            finally:
                self.waiting.discard(tid)

    def ping(self) -> bool:
        """Answers once the pack is placed and built (the registry's readiness check)."""
        return True

    def leave(self, tid: str) -> int:
        """The trial has ended (or Tune stopped it): mask it out; returns members left."""
        with self.cond:
            self._leave(tid)
            self.cond.notify_all()
            return len(self.slots)

    def _leave(self, tid: str) -> None:
        slot = self.slots.pop(tid, None)
        if slot is not None:
            self.pack.stop(slot)
        for table in (self.results, self.best, self.specs):
            table.pop(tid, None)

    def _wait_s(self) -> float | None:
        """0: train the next epoch now; else how long to wait (None: until notified)."""
        live = self.pack.running()
        running = {t for t, s in self.slots.items() if s in live}
        if not running or not running <= self.waiting or running & self.results.keys():
            return None
        gather = GATHER_S - (time.monotonic() - self.last_join)
        if self.pack.free_slots() and gather > 0:
            return gather
        return 0.0

    def _epoch(self) -> None:
        by_slot = {s: t for t, s in self.slots.items()}
        for slot, metrics in self.pack.run_epoch():
            tid, state = by_slot[slot], self.pack.slots[slot]
            assert state is not None
            spec = self.specs[tid]
            if state.status == "diverged":  # reported once, as an unpacked trial does
                self.results[tid] = {"metrics": diverged_metrics(spec, RuntimeError(
                    state.error)), "files": None, "done": True}
                continue
            save = _should_save(metrics, self.best[tid], self.shared.checkpoint_every,
                                state.member.epochs)
            self.results[tid] = {"metrics": {**metrics, "precision": self.precision},
                                 "files": self._files(slot, spec) if save else None,
                                 "done": state.status != "running"}
        self.cond.notify_all()

    def _files(self, slot: int, spec: SweepSpec) -> dict[str, bytes]:
        return {CKPT_FILE: _dump(fit_checkpoint(self.pack, slot, spec.train)),
                PACK_FILE: _dump(self.pack.checkpoint(slot))}


def _dump(ckpt: dict[str, Any]) -> bytes:
    check_plain(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def _load(data: bytes) -> dict[str, Any]:
    """A checkpoint file's bytes, read as ``load_checkpoint`` reads a file (weights only)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / PACK_FILE
        path.write_bytes(data)
        return load_checkpoint(path)


def fit_checkpoint(pack: Pack, slot: int, train: Any) -> dict[str, Any]:
    """The member as a ``trainer.loop.fit`` checkpoint: weights, the best epoch's weights and
    the loop's bookkeeping, enough for ``fit(..., until_epoch=epoch)`` to rebuild the best model
    (tuning/results.py). The optimiser's moments are not in it (a fresh optimiser's state):
    a member resumes from its pack checkpoint instead."""
    state = pack.slots[slot]
    assert state is not None and state.best_row is not None
    member = state.member
    cfg = pack.model_cfg.model_copy(update={"dropout": member.dropout})
    net = build_model(cfg, pack.data.input_shape, pack.data.n_outputs, seed=member.seed)
    from_row(net, state.best_row.cpu())
    best = {k: v.detach().clone() for k, v in net.state_dict().items()}
    from_row(net, pack.flat[slot].detach().cpu())
    opt = make_optimizer(net.parameters(), train)
    sched = make_scheduler(opt, train)
    return {"model": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": state.gen.get_state(), "torch_rng": torch.get_rng_state(), "cuda_rng": None,
            "epoch": state.epoch, "best_val_loss": state.best_val_loss,
            "best_epoch": state.best_epoch, "best_state": best, "bad_epochs": state.bad_epochs,
            "stopped_early": state.stopped_early, "history": [dict(h) for h in state.history]}


def member_key(spec: SweepSpec, overrides: dict[str, Any]) -> str:
    """What a trial's pack must share: architecture, batch size, optimiser, device, threads
    (``pack_key``) and the data variant."""
    text = repr((pack_key(spec.model, spec.train), variant_key(overrides)))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class PackRegistry:
    """Which pack each trial joins; owns the pack actors (they die with the sweep's driver)."""

    def __init__(self, shared: Shared, size: int, cpus: float, gpus: float) -> None:
        self.shared, self.size, self.cpus, self.gpus = shared, size, cpus, gpus
        self.packs: dict[str, list[tuple[Any, set[str]]]] = {}  # key -> [(actor, trial ids)]
        self.of: dict[str, tuple[str, Any]] = {}  # trial id -> (key, actor)
        self.ready: dict[Any, Any] = {}  # actor -> its ping: done once it is placed and built

    def assign(self, tid: str, config: dict[str, Any]) -> Any:
        """A pack of the trial's key with a place for it (a new one if every pack is full)."""
        self.release(tid)
        key = member_key(*trial_spec(self.shared, config))
        packs = self.packs.setdefault(key, [])
        free = [p for p in packs if len(p[1]) < self.size]
        if free:  # a placed one first, then the fullest (an idle one is warm: no new process)
            actor, members = max(free, key=lambda p: (self._placed(p[0]), len(p[1])))
            if not self._placed(actor):  # waits for resources an idle pack may hold
                self._drop_idle()
        else:
            self._drop_idle()  # an idle pack of another key holds the resources it needs
            # each relay of a pack holds DRIVER_CPU: a pack and its relays hold exactly
            # cpus_per_worker, as one unpacked trial does
            cpus = max(self.cpus - self.size * DRIVER_CPU, DRIVER_CPU)
            server: Any = ray.remote(PackServer).options(
                num_cpus=cpus, num_gpus=self.gpus, max_concurrency=self.size + 4,
                max_restarts=0).remote(self.shared, config, self.size)
            actor, members = server, set()
            packs.append((actor, members))
            self.ready[actor] = server.ping.remote()
        members.add(tid)
        self.of[tid] = (key, actor)
        return actor

    def release(self, tid: str) -> None:
        """``tid`` left its pack (ended, stopped by Tune, or failed); a pack that crashed goes."""
        if tid not in self.of:
            return
        key, actor = self.of.pop(tid)
        entry = next(p for p in self.packs[key] if p[0] is actor)
        entry[1].discard(tid)
        left = actor.leave.remote(tid)
        if self._placed(actor):  # an unplaced pack takes the leave when it starts: no wait
            try:
                ray.get(left, timeout=60)
            except ray.exceptions.RayActorError:  # the pack crashed: none of its members is
                for other in entry[1]:  # in it any more; Tune retries them into a new pack
                    self.of.pop(other, None)
                entry[1].clear()
                self._remove(key, entry)
                return
            except ray.exceptions.GetTimeoutError:  # busy: it takes the leave in turn
                pass
        if not entry[1] and not all(self._placed(a) for a in self.ready if a is not actor):
            self._remove(key, entry)  # idle while another pack waits for resources: give them
        # otherwise a pack left empty stays, idle, for the next trials of its key: a new pack
        # costs a process that imports torch, and a slow first epoch (~2.5 s and ~1 s here)

    def _placed(self, actor: Any) -> bool:
        ref = self.ready.get(actor)
        return ref is not None and bool(ray.wait([ref], timeout=0)[0])

    def _remove(self, key: str, entry: tuple[Any, set[str]]) -> None:
        self.packs[key].remove(entry)
        self.ready.pop(entry[0], None)
        ray.kill(entry[0])

    def _drop_idle(self) -> None:
        for key, packs in self.packs.items():
            for entry in [p for p in packs if not p[1]]:
                self._remove(key, entry)

    def close(self) -> int:
        """The sweep ended: kill every pack still alive (idle ones, or any whose members did
        not all leave); returns how many there were."""
        actors = [actor for packs in self.packs.values() for actor, _ in packs]
        for actor in actors:
            ray.kill(actor)
        self.packs.clear()
        self.of.clear()
        self.ready.clear()
        return len(actors)
