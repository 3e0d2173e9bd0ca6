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
``pack_pays`` holds for every architecture and batch size the space can produce, else runs the
normal trainable. On a CPU ``auto`` never packs: the trial compute gains are real (3-5x for
[32]/64, see ``pack_pays``) but the whole sweep measured on the 2-core build machine was
slower packed (0.75x wall, benchmarks/bench_pack_sweep.py: a relay process per trial in flight
costs more than the compute saved), and ``auto`` must not pack where it does not pay.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import tune

from trainer.pack_member import pack_pays
from tuning.config import PAUSING, SweepSpec
from tuning.pack_actor import PackRegistry
from tuning.relay import run_packed_trial
from tuning.trainable import DRIVER_CPU, Shared

AUTO_SIZE = 8


def pack_size(spec: SweepSpec) -> int:
    """Trials per pack for this sweep: 1 means unpacked."""
    pack = spec.tune.pack
    if isinstance(pack, int):
        return pack
    if pack == "off" or spec.resources.workers_per_trial > 1 or spec.tune.search in PAUSING:
        return 1
    if spec.train.device != "cuda":  # measured: no whole-sweep gain on CPU (module docstring)
        return 1
    return AUTO_SIZE if _pays_everywhere(spec) else 1


def _pays_everywhere(spec: SweepSpec) -> bool:
    """``pack_pays`` (its GPU rule) for every model and batch size the space can produce: a
    dimension that is not a list of choices never packs."""
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
    device = "cuda"
    for kind in values.get("model.kind", [spec.model.kind]):
        for hidden in values.get("model.hidden", [spec.model.hidden]):
            model = spec.model.model_copy(update={"kind": kind, "hidden": hidden})
            for batch in values.get("train.batch_size", [spec.train.batch_size]):
                if not pack_pays(model, int(batch), device):
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
    masked out; the pack goes when empty). Wrap it in ``Live`` for resumes."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        self.registry.release.remote(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.registry.release.remote(trial.trial_id)
