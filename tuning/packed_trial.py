"""``tune.pack``: small trials of one architecture trained together, each still a Tune trial.

Every trial of a packed sweep is a relay: a Tune function trainable that holds almost no
resources (``DRIVER_CPU``), asks the sweep's ``PackRegistry`` for a pack of its key (what
members must share: ``trainer.pack_member.pack_key`` and the data variant), joins it with its
own ``Member`` (lr, weight decay, momentum, dropout, seed, patience ...) or its checkpoint,
and then reports each of its epochs to Tune as an unpacked trial does: the same metrics, the
same checkpoints (``tuning/trainable.py``'s rule and file), ``diverged_metrics`` when its loss
turns nan. So the searcher learns from each member, the scheduler stops each member on its
own (``PackLeaver`` masks it out of its pack), MLflow's callback makes each its own child run,
and a retried or resumed trial joins a pack from its own checkpoint.

``tune.pack: N`` packs up to N trials; ``max_concurrent`` then counts packs (N x that many
trials in flight). ``auto`` packs ``AUTO_SIZE`` on a GPU (``train.device: cuda``) where
``pack_pays`` holds for every architecture and batch size the space can produce. On a CPU it
packs ``CPU_AUTO_SIZE`` only where the whole sweep measured faster packed: models whose trial
compute packs 3x or better, sweeps with at least ``CPU_MIN_ROW_EPOCHS`` of work, every trial
running its whole budget (see the constants); ``train.device: auto`` counts as a CPU only where
``resources.gpus_per_worker`` is 0; elsewhere it runs the normal trainable. A packed
sweep starts a relay process per trial in flight, once per sweep (~10 s of CPU on 2 cores), so
a small sweep is slower packed even where each epoch is 3-5x faster.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import tune

from trainer.pack_member import pack_pays
from tuning.config import PAUSING, SweepSpec
from tuning.pack_actor import PackRegistry
from tuning.relay import run_packed_trial
from tuning.space import grid_size
from tuning.trainable import DRIVER_CPU, Shared

AUTO_SIZE = 8
"""``auto`` on a GPU: members per pack."""
CPU_AUTO_SIZE = 4
"""``auto`` on a CPU: members per pack (the size the whole-sweep figures were measured at)."""
CPU_MAX_WIDTH = 64
CPU_MAX_WIDTH_X_BATCH = 8_192
"""``auto`` on a CPU packs only MLPs of one hidden layer of at most ``CPU_MAX_WIDTH`` units
whose width x batch size is at most this: the cells of ``pack_pays``'s table at 3x or more
of trial compute ([32] at 64 and 256, [64] at 64 and 128). Whole sweeps of 32 trials x 20
epochs on adult (bench_pack_sweep.py, 2 cores, unpacked / packed): [32]/64 71.2 / 46.1 s
(1.54x), [64]/128 49.4 / 44.3 s (1.12x), [128, 64]/512 46.5 / 58.9 s (0.79x, not packed)."""
CPU_MIN_ROW_EPOCHS = 14_500_000
"""``auto`` on a CPU packs only sweeps with at least this many trials x epochs x training
rows (32 x 20 x adult's 22,792 = 14.59M, where both models above paid). Measured for [32]/64:
16 trials x 6 epochs (2.2M) was 0.66x (16.4 / 25.1 s): a packed sweep starts a relay
process per trial in flight (~10 s of CPU on 2 cores, once per sweep), and only the trial
compute it saves (2.5x here) pays that back; the two sizes put the break-even near 5.3M."""


def pack_size(spec: SweepSpec, train_rows: int | None = None) -> int:
    """Trials per pack for this sweep: 1 means unpacked. ``train_rows`` (the training split's
    rows) lets ``auto`` pack on a CPU; without it ``auto`` never packs there."""
    pack = spec.tune.pack
    if isinstance(pack, int):
        return pack
    if pack == "off" or spec.resources.workers_per_trial > 1 or spec.tune.search in PAUSING:
        return 1
    if spec.train.device == "cuda":
        return AUTO_SIZE if _pays_everywhere(spec, "cuda") else 1
    on_cpu = spec.train.device == "cpu" or not spec.resources.gpus_per_worker
    return CPU_AUTO_SIZE if on_cpu and _cpu_pays(spec, train_rows) else 1


def _cpu_pays(spec: SweepSpec, train_rows: int | None) -> bool:
    """The whole sweep measured faster packed on a CPU (the constants above): small models,
    enough work, and every trial running its whole budget (no scheduler that stops trials,
    no early stopping: the work would be less than the budget says)."""
    if train_rows is None or spec.train.early_stopping is not None:
        return False
    # asha / median stop trials; auto may choose one of them (conservative: never packs)
    if spec.tune.search not in ("random", "grid", "bayes"):
        return False
    epochs = _smallest(spec, "train.epochs", spec.train.epochs)
    # grid runs each combination once (num_samples is not used); random repeats grid dims
    trials = grid_size(spec.tune.space) if spec.tune.search == "grid" \
        else spec.tune.num_samples
    if trials * epochs * train_rows < CPU_MIN_ROW_EPOCHS:
        return False
    return _pays_everywhere(spec, "cpu", CPU_MAX_WIDTH_X_BATCH, max_layers=1,
                            max_width=CPU_MAX_WIDTH)


def _smallest(spec: SweepSpec, path: str, default: int) -> int:
    """The smallest value ``path`` takes in the space (the work a trial may do at least)."""
    dim = spec.tune.space.get(path)
    if dim is None:
        return default
    kind, args = next(iter(dim.items()))
    values = list(args) if kind in ("choice", "grid") else [args[0]]
    return int(min(values))


def _pays_everywhere(spec: SweepSpec, device: str, max_width_x_batch: int | None = None,
                     max_layers: int | None = None, max_width: int | None = None) -> bool:
    """``pack_pays`` on ``device`` (and the optional bounds) for every model and batch size
    the space can produce: a dimension that is not a list of choices never packs."""
    space = spec.tune.space
    values: dict[str, list[Any]] = {}
    for path in ("model.kind", "model.hidden", "train.batch_size"):
        dim = space.get(path)
        if dim is None:
            continue
        kind, args = next(iter(dim.items()))
        if kind not in ("choice", "grid"):
            return False
        values[path] = list(args)
    for kind in values.get("model.kind", [spec.model.kind]):
        for hidden in values.get("model.hidden", [spec.model.hidden]):
            model = spec.model.model_copy(update={"kind": kind, "hidden": hidden})
            for batch in values.get("train.batch_size", [spec.train.batch_size]):
                if not pack_pays(model, int(batch), device):
                    return False
                widest = max((int(h) for h in hidden), default=0)
                if max_width_x_batch is not None and widest * int(batch) > max_width_x_batch:
                    return False
                if max_layers is not None and len(hidden) > max_layers:
                    return False
                if max_width is not None and widest > max_width:
                    return False
    return True


def packed_trainable(spec: SweepSpec, shared: Shared, size: int) -> tuple[Any, Any]:
    """The relay trainable and the registry its trials share (the driver keeps the handle)."""
    res = spec.resources
    registry = ray.remote(PackRegistry).options(num_cpus=0).remote(
        shared, size, float(res.cpus_per_worker), float(res.gpus_per_worker))
    trainable = tune.with_resources(tune.with_parameters(run_packed_trial, registry=registry),
                                    {"CPU": DRIVER_CPU})
    return trainable, registry


def close_packs(registry: Any) -> None:
    """The sweep ended (or failed): kill the packs still alive and the registry, so that a
    second sweep in the same driver finds its Ray as the first one did."""
    try:
        ray.get(registry.close.remote(), timeout=60)
    except (ray.exceptions.RayError, TimeoutError):  # gone already: nothing left to kill
        pass
    ray.kill(registry)


class PackLeaver(tune.Callback):
    """Driver side: a trial that Tune stopped, or that failed, leaves its pack (its row is
    masked out; the registry keeps or ends the pack). Wrap it in ``Live`` for resumes."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        self.registry.release.remote(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.registry.release.remote(trial.trial_id)
