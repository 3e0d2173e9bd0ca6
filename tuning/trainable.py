"""What one Ray Tune trial runs: a single process, or a Ray Train DDP group of workers.

The data was prepared once in the driver and arrives through Ray's object store (one
``ArrayData`` per distinct imputation choice: arrays only, so a trial worker never imports
pandas or scikit-learn); a trial only builds its model and trains it.
Checkpoints are written when the validation loss improves (the best weights are then in the
latest checkpoint), when a pausing scheduler needs them, and on the last epoch.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from trainer.arrays import ArrayData
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.loop import Checkpoint, DivergedError, TensorData, fit, resolve_device
from trainer.models import explain_oom, is_oom, new_model, precision
from tuning.resources import cap_gpu_memory
from tuning.space import decode_config, variant_key

CKPT_FILE = "checkpoint.pt"
WORST = {"min": 1e9, "max": -1e9}
DRIVER_CPU = 0.01
"""CPU held by the Tune trial that drives a multi-worker Ray Train run (0 is refused)."""
FAULT_ENV = "RUNGWISE_TEST_FAULT"
"""Test-only hook: ``crash:<rate>:<epoch>[:always]`` (see ``_fault_hook``, tests/reliability)."""
FAULT_DIR_ENV = "RUNGWISE_TEST_FAULT_DIR"
"""Test-only: the folder of the fault hook's marker files (default: the temp folder)."""


@dataclass
class Shared:
    """What the driver hands every trial (small: the spec and object refs)."""

    spec: Any
    prepared: dict[str, Any]
    """variant key -> ObjectRef of an ArrayData."""
    raw: Any
    """ObjectRef of the RawData, for imputation choices that cannot be enumerated."""
    checkpoint_every: int
    storage_path: str = ""
    """Absolute: where Ray Train keeps the checkpoints of multi-worker trials."""
    fault: str = field(default_factory=lambda: os.environ.get(FAULT_ENV, ""))
    fault_dir: str = field(default_factory=lambda: os.environ.get(FAULT_DIR_ENV, ""))
    """Test-only: the driver's fault-hook settings, read when the sweep starts. Workers of a
    Ray instance that is already running never see variables set in the driver later."""


def trial_spec(shared: Shared, config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    overrides = decode_config(config)
    return shared.spec.with_overrides(overrides), overrides


def get_prepared(shared: Shared, spec: Any, overrides: dict[str, Any]) -> ArrayData:
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


def _restore(spec: Any) -> dict[str, Any] | None:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state = load_checkpoint(Path(d) / CKPT_FILE)
    for group in state["optimizer"]["param_groups"]:  # PBT may have changed train.lr
        group["lr"] = spec.train.lr
        group["initial_lr"] = spec.train.lr
    return state


def run_trial(config: dict[str, Any], shared: Shared) -> None:
    """The Tune function trainable for a single-process trial."""
    try:
        _run_trial(config, shared)
    except Exception as exc:
        if is_oom(exc):
            spec, _ = trial_spec(shared, config)
            arrays = ray.get(next(iter(shared.prepared.values()))) if shared.prepared else None
            n_inputs = int(arrays.x_train[0].size) if arrays is not None else 0
            raise explain_oom(exc, spec.model, spec.train, n_inputs,
                              gpu_share=float(spec.resources.gpus_per_worker),
                              data_bytes=data_bytes(arrays)) from None
        raise


def data_bytes(arrays: ArrayData | None) -> int:
    """What a trial's splits take on its device (features float32, as the arrays are)."""
    if arrays is None:
        return 0
    return sum(int(getattr(arrays, f"{a}_{s}").nbytes) for a in "xy"
               for s in ("train", "val", "test"))


def _run_trial(config: dict[str, Any], shared: Shared) -> None:
    spec, overrides = trial_spec(shared, config)
    torch.set_num_threads(spec.train.threads)
    device = resolve_device(spec.train.device)  # settled by the driver: cpu without a GPU
    cap_gpu_memory(float(spec.resources.gpus_per_worker), device)  # before any allocation
    prepared = get_prepared(shared, spec, overrides)
    data = TensorData.from_prepared(prepared)
    net = new_model(spec.model, prepared, seed=spec.train.seed)
    best = [float("inf")]
    fault = _fault_hook(shared)
    tag = {"precision": precision(device)}

    def on_epoch(metrics: dict[str, Any], ckpt: Checkpoint | None) -> None:
        fault(int(metrics["epoch"]))
        metrics.update(tag)
        if ckpt is not None and _should_save(metrics, best, shared.checkpoint_every,
                                             spec.train.epochs):
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(ckpt(), Path(d) / CKPT_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)

    try:
        fit(net, data, spec.train, on_epoch=on_epoch, checkpoint=_restore(spec),
            checkpoint_every=1)
    except DivergedError as exc:
        tune.report(diverged_metrics(spec, exc))


def diverged_metrics(spec: Any, exc: Exception) -> dict[str, Any]:
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
                             callbacks=[TuneReportCallback()]))
    trainer.fit()


def ddp_worker(loop_config: dict[str, Any]) -> None:
    """One DDP rank: the same ``fit`` as a single trial, on this rank's shard."""
    import ray.train
    import ray.train.torch
    from ray.util import get_current_placement_group
    from torch.nn.parallel import DistributedDataParallel

    shared: Shared = loop_config["shared"]
    spec, overrides = trial_spec(shared, loop_config["config"])
    torch.set_num_threads(spec.train.threads)
    prepared = get_prepared(shared, spec, overrides)
    device = ray.train.torch.get_device()
    net = new_model(spec.model, prepared, seed=spec.train.seed).to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                    else None)
    rank = ray.train.get_context().get_world_rank()
    pg = get_current_placement_group()
    extra = {"pg_id": pg.id.hex()} if pg is not None else {}
    extra["precision"] = precision(device)
    extra["nodes"] = _nodes_of_ranks()
    best = [float("inf")]

    def on_epoch(metrics: dict[str, Any], ckpt: Checkpoint | None) -> None:
        metrics = {**metrics, **extra}
        if rank == 0 and ckpt is not None and _should_save(
                metrics, best, shared.checkpoint_every, spec.train.epochs):
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(ckpt(), Path(d) / CKPT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    ckpt = ray.train.get_checkpoint()
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(Path(d) / CKPT_FILE)
    try:
        fit(model, TensorData.from_prepared(prepared), spec.train, on_epoch=on_epoch,
            checkpoint=state, checkpoint_every=1 if rank == 0 else 0)
    except DivergedError as exc:
        ray.train.report({**diverged_metrics(spec, exc), **extra})


def _nodes_of_ranks() -> int:
    """On how many nodes this trial's ranks run (all ranks take part; rank 0 reports it)."""
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return len(set(everyone))


def _fault_hook(shared: Shared) -> Any:
    """Test-only fault injection, off unless ``RUNGWISE_TEST_FAULT`` is set in the driver
    (when the sweep starts) or in the trial's environment.

    ``crash:RATE:EPOCH[:always]`` crashes the share RATE of trials at EPOCH, once (the retry
    from the last checkpoint then succeeds) or on every attempt. Trials are numbered in the
    order they first reach the hook (claim files in ``RUNGWISE_TEST_FAULT_DIR``), and trial
    n is chosen when floor((n+1)*RATE) > floor(n*RATE): exactly floor(N*RATE) of the first N
    trials crash, whatever their random ids. Use a fresh folder per sweep. The file
    ``rungwise-fault-crashed-<trial id>`` records each injected crash, one line per attempt."""
    spec = shared.fault or os.environ.get(FAULT_ENV, "")
    if not spec.startswith("crash:"):
        return lambda epoch: None
    _, rate, at, *mode = spec.split(":")
    folder = Path(shared.fault_dir or os.environ.get(FAULT_DIR_ENV) or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    trial_id = tune.get_context().get_trial_id()
    marker = folder / f"rungwise-fault-crashed-{trial_id}"
    n = _arrival(folder, trial_id)
    chosen = math.floor((n + 1) * float(rate) + 1e-9) > math.floor(n * float(rate) + 1e-9)
    always = mode == ["always"]

    def hook(epoch: int) -> None:
        if chosen and epoch == int(at) and (always or not marker.exists()):
            with marker.open("a") as fh:
                fh.write(f"crashed at epoch {epoch}\n")
            raise RuntimeError(f"injected fault at epoch {epoch} (test hook)")

    return hook


def _arrival(folder: Path, trial_id: str) -> int:
    """This trial's number in arrival order: the first free ``rungwise-fault-claim-<k>``
    file, taken atomically (O_EXCL), so that concurrent trials never share a number."""
    mine = folder / f"rungwise-fault-seq-{trial_id}"
    if mine.exists():
        return int(mine.read_text())
    n = 0
    while True:
        try:
            fd = os.open(folder / f"rungwise-fault-claim-{n:05d}",
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            n += 1
            continue
        os.write(fd, trial_id.encode())
        os.close(fd)
        break
    mine.write_text(str(n))
    return n
