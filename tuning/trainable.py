"""What one Ray Tune trial runs: a single process, or a Ray Train DDP group of workers.

The data was prepared once in the driver and arrives through Ray's object store (one
``ArrayData`` per distinct imputation choice: arrays only, so a trial worker never imports
pandas or scikit-learn); a trial calls ``trainer.run.train_run``, as every other training
does, with hooks that report each epoch to Tune (or Ray Train) and save checkpoints.
Checkpoints are written when the validation loss improves (the best weights are then in the
latest checkpoint), when a pausing scheduler needs them, and on the last epoch.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from trainer.arrays import ArrayData
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.loop import Checkpoint, DivergedError, OnEpoch, resolve_device
from trainer.models import precision
from trainer.run import Hooks, train_run
from tuning.config import SweepSpec
from tuning.resources import cap_gpu_memory
from tuning.space import TrialConfig, variant_key

CKPT_FILE = "checkpoint.pt"
WORST = {"min": 1e9, "max": -1e9}
DRIVER_CPU = 0.01
"""CPU held by the Tune trial that drives a multi-worker Ray Train run (0 is refused)."""


@dataclass
class Shared:
    """What the driver hands every trial (small: the spec and object refs)."""

    spec: SweepSpec
    prepared: dict[str, Any]
    """variant key -> ObjectRef of an ArrayData."""
    raw: Any
    """ObjectRef of the SplitData, for imputation choices that cannot be enumerated."""
    checkpoint_every: int
    storage_path: str = ""
    """Absolute: where Ray Train keeps the checkpoints of multi-worker trials."""


def trial_spec(shared: Shared, config: dict[str, Any]) -> tuple[SweepSpec, dict[str, Any]]:
    """The trial's validated spec and its decoded choices (``TrialConfig``)."""
    trial = TrialConfig.of(shared.spec, config)
    return trial.spec, trial.overrides


def get_prepared(shared: Shared, spec: SweepSpec, overrides: dict[str, Any]) -> ArrayData:
    ref = shared.prepared.get(variant_key(overrides))
    if ref is not None:
        return ray.get(ref)
    # an imputation choice that could not be enumerated: fit it here (imports pandas + sklearn)
    from trainer.pipeline import prepare

    return prepare(ray.get(shared.raw), spec.impute).arrays()


def _should_save(metrics: dict[str, Any], best: list[float], every: int, epochs: int) -> bool:
    improved = metrics["val_loss"] < best[0]
    if improved:
        best[0] = metrics["val_loss"]
    epoch = int(metrics["epoch"])
    return improved or epoch == epochs or (every > 0 and epoch % every == 0)


def _load(ckpt: Any) -> dict[str, Any] | None:
    """A Tune / Ray Train checkpoint's state, or None."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_checkpoint(Path(d) / CKPT_FILE)


def _restore(spec: SweepSpec) -> dict[str, Any] | None:
    state = _load(tune.get_checkpoint())
    if state is None:
        return None
    for group in state["optimizer"]["param_groups"]:  # PBT may have changed train.lr
        group["lr"] = spec.train.lr
        group["initial_lr"] = spec.train.lr
    return state


def run_trial(config: dict[str, Any], shared: Shared) -> None:
    """The Tune function trainable for a single-process trial."""
    spec, overrides = trial_spec(shared, config)
    torch.set_num_threads(spec.train.threads)
    device = resolve_device(spec.train.device)  # settled by the driver: cpu without a GPU
    gpu_share = float(spec.resources.gpus_per_worker)
    cap_gpu_memory(gpu_share, device)  # before any allocation
    prepared = get_prepared(shared, spec, overrides)
    report = _reporter(spec, shared, {"precision": precision(device)}, tune.report,
                       tune.Checkpoint)
    hooks = Hooks(on_epoch=report, checkpoint_every=1, resume_from=_restore(spec),
                  gpu_share=gpu_share)
    try:
        train_run(spec.model, spec.train, prepared, hooks, evaluate_test=False)
    except DivergedError as exc:
        tune.report(diverged_metrics(spec, exc))


def _reporter(spec: SweepSpec, shared: Shared, extra: dict[str, Any], report: Any,
              checkpoint_type: Any, rank: int = 0) -> OnEpoch:
    """``on_epoch`` for Tune (or Ray Train): every epoch reported with ``extra``; rank 0
    attaches a checkpoint when ``_should_save`` says so."""
    best = [float("inf")]

    def on_epoch(metrics: dict[str, Any], ckpt: Checkpoint | None) -> None:
        metrics = {**metrics, **extra}
        if rank == 0 and ckpt is not None and _should_save(
                metrics, best, shared.checkpoint_every, spec.train.epochs):
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(ckpt(), Path(d) / CKPT_FILE)
                report(metrics, checkpoint=checkpoint_type.from_directory(d))
        else:
            report(metrics)

    return on_epoch


def diverged_metrics(spec: SweepSpec, exc: Exception) -> dict[str, Any]:
    """A diverged trial reports the worst value once, so searchers avoid its region."""
    worst = WORST[spec.tune.mode]
    return {"epoch": -1, spec.tune.metric: worst, "val_loss": WORST["min"],
            "diverged": 1, "error": str(exc)[:300]}


# --- multi-worker trials: Ray Train (V2) TorchTrainer with DDP ------------------------


def run_ddp_trial(config: dict[str, Any], shared: Shared) -> None:
    """A Tune trial that runs a Ray Train DDP group; epochs reach Tune's schedulers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec, _ = trial_spec(shared, config)
    res = spec.resources
    gpus = float(res.gpus_per_worker)  # settled by the driver (tuning/resources.py)
    # the trial's own driver holds DRIVER_CPU: take it off the workers so that a trial that
    # asks for the whole machine (2 workers x 1 CPU on 2 cores) still fits
    per_worker = {"CPU": res.cpus_per_worker * (1 - DRIVER_CPU),
                  **({"GPU": gpus} if gpus else {})}
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker=ddp_worker,
        train_loop_config={"config": config, "shared": shared},
        scaling_config=ScalingConfig(num_workers=res.workers_per_trial, use_gpu=gpus > 0,
                                     resources_per_worker=per_worker,
                                     placement_strategy=res.placement.upper()),
        run_config=RunConfig(name=f"ddp-{trial_id}", storage_path=shared.storage_path,
                             callbacks=[TuneReportCallback()]))  # type: ignore[list-item]  # Ray's stubs
    trainer.fit()


def ddp_worker(loop_config: dict[str, Any]) -> None:
    """One DDP rank: the same ``train_run`` as a single trial, on this rank's shard."""
    import ray.train
    import ray.train.torch
    from ray.util import get_current_placement_group

    shared: Shared = loop_config["shared"]
    spec, overrides = trial_spec(shared, loop_config["config"])
    torch.set_num_threads(spec.train.threads)
    prepared = get_prepared(shared, spec, overrides)
    device = ray.train.torch.get_device()
    rank = ray.train.get_context().get_world_rank()
    pg = get_current_placement_group()
    extra: dict[str, Any] = {"pg_id": pg.id.hex()} if pg is not None else {}
    extra["precision"] = precision(device)
    extra["nodes"] = _nodes_of_ranks()
    report = _reporter(spec, shared, extra, ray.train.report, ray.train.Checkpoint, rank)
    hooks = Hooks(on_epoch=report, checkpoint_every=1 if rank == 0 else 0,
                  resume_from=_load(ray.train.get_checkpoint()),
                  wrap=lambda net: _ddp(net, device),
                  gpu_share=float(spec.resources.gpus_per_worker))
    try:
        train_run(spec.model, spec.train, prepared, hooks, evaluate_test=False)
    except DivergedError as exc:
        ray.train.report({**diverged_metrics(spec, exc), **extra})


def _ddp(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net.to(device), device_ids=[device.index]
                                   if device.type == "cuda" else None)


def _nodes_of_ranks() -> int:
    """On how many nodes this trial's ranks run (all ranks take part; rank 0 reports it)."""
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return len(set(everyone))
