"""`rungwise tune`: one sweep = one MLflow parent run whose children are exactly its trials.

driver: validate space -> check MLflow -> read + split once -> prepare once per imputation
choice -> object store -> Ray Tune (searcher + scheduler) -> best trial evaluated on the
test split -> pyfunc model on the parent run -> registry (challenger, champion if none).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback

from trainer.data import SplitData
from trainer.pipeline import Prepared, prepare, split_data
from tuning import registry
from tuning.callback import Live, MlflowSweepCallback, SweepTracker
from tuning.config import SweepSpec
from tuning.errors import RungwiseError
from tuning.fits import check_sweep_fits
from tuning.localray import loopback_node
from tuning.packed_trial import PackLeaver, close_packs, pack_size, packed_trainable
from tuning.parent import ParentRun
from tuning.progress import ProgressCallback
from tuning.resources import Cluster, Settled, check_fits, read_cluster, settle
from tuning.results import best_trial, evaluate_best
from tuning.space import impute_variants, validate_space, variant_key
from tuning.storage import StoragePath, child_of, preflight, spec_folder
from tuning.strategies import Strategy, build_strategy
from tuning.tracking import RunLogger, check_reachable, resolve_tracking_uri
from tuning.trainable import DRIVER_CPU, Shared, run_ddp_trial, run_trial

STATE_FILE = "rungwise-sweep.json"


@dataclass
class SweepResult:
    parent_run_id: str | None
    strategy: str
    reason: str
    best_overrides: dict[str, Any]
    best_value: float
    test_metrics: dict[str, float]
    model_uri: str | None = None
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    experiment_path: str = ""
    tracking_uri: str | None = None


def _state_path(spec: SweepSpec) -> StoragePath:
    return spec_folder(spec) / STATE_FILE


def init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Checkpoints are kept to one per trial, which makes Tune snapshot its (small) state
    # more often; measured in benchmarks/, the warning about it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    with loopback_node(address):  # a local Ray listens on 127.0.0.1 only
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, configure_logging=True)
    if main and callable(before):  # ray.init replaces it with a handler that aborts
        signal.signal(signal.SIGTERM, before)


def prepare_variants(spec: SweepSpec, raw: SplitData) -> dict[str, Prepared]:
    """Prepare once per distinct imputation choice."""
    variants = impute_variants(spec) or []
    return {variant_key(v): prepare(raw, spec.with_overrides(v).impute) for v in variants}


def share_data(local: dict[str, Prepared]) -> dict[str, Any]:
    """Object refs of the arrays alone: trials never unpickle the fitted preprocessor."""
    return {k: ray.put(p.arrays()) for k, p in local.items()}


def warm_store(uri: str | None) -> None:
    """Open the tracking store once: on a fresh SQLite file this runs MLflow's schema
    migrations (about 5 s here), which then overlap with ``ray.init`` instead of following it."""
    if uri:
        from tuning.tracking import client

        client(uri).search_experiments(max_results=1)


def _prepare_and_open_store(spec: SweepSpec, raw: SplitData,
                            uri: str | None) -> dict[str, Prepared]:
    local = prepare_variants(spec, raw)
    warm_store(uri)
    return local


def _trainable(spec: SweepSpec, shared: Shared) -> Any:
    """``spec`` has its resources settled (see ``_gpus``): every trial reserves what it uses."""
    res = spec.resources
    if res.workers_per_trial > 1:
        return tune.with_resources(tune.with_parameters(run_ddp_trial, shared=shared),
                                   {"CPU": DRIVER_CPU})
    return tune.with_resources(tune.with_parameters(run_trial, shared=shared),
                               {"CPU": res.cpus_per_worker, "GPU": float(res.gpus_per_worker)})


def _check_model_kinds(spec: SweepSpec, prepared: Prepared | None) -> None:
    """A CNN on a table fails every trial: say so once, before any trial starts."""
    dim = spec.tune.space.get("model.kind")
    kinds = list(next(iter(dim.values()))) if dim else [spec.model.kind]
    if prepared is not None and "cnn" in kinds and len(prepared.input_shape) == 1:
        raise RungwiseError(f"model.kind: cnn needs image data (an .npz with x of shape "
                            f"(N, H, W) or (N, C, H, W)); this table has "
                            f"{prepared.input_shape[0]} features: use mlp")


def _check_fits(res: Any, settled: Settled, cluster: Cluster) -> None:
    """A trial larger than the whole cluster would wait forever: say so before it starts.
    With an autoscaler, a trial that only a node it can add fits waits for that node."""
    note = check_fits(settled, cluster)
    if note:
        print(note, file=sys.stderr, flush=True)


def _gpus(spec: SweepSpec) -> tuple[Settled, Cluster]:
    """``resources.gpus_per_worker`` and ``train.device`` settled against this cluster, once,
    before Tune starts (tuning/resources.py has the rules)."""
    cluster = read_cluster()
    return settle(spec.resources, spec.train.device, cluster), cluster


def _tuner(spec: SweepSpec, strategy: Strategy, trainable: Any, path: StoragePath,
           callbacks: list[Any], resume: bool, pack: int) -> tune.Tuner:
    if resume:
        # the run config, callbacks included, comes back from the sweep's folder: the
        # ``Live`` callbacks in it find this driver's objects by key (tuning/callback.py)
        return tune.Tuner.restore(path.fs_path, trainable, resume_unfinished=True,
                                  resume_errored=True, param_space=strategy.param_space,
                                  storage_filesystem=path.fs)
    t = spec.tune
    return tune.Tuner(
        trainable, param_space=strategy.param_space,
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, search_alg=strategy.search_alg,
            scheduler=strategy.scheduler, num_samples=strategy.num_samples,
            # the searchers limit concurrency themselves; Tune's own limit is for grid only
            max_concurrent_trials=t.max_concurrent * pack
            if strategy.search_alg is None else None,
            time_budget_s=t.time_budget_s,
            reuse_actors=spec.resources.workers_per_trial == 1),
        run_config=tune.RunConfig(
            name=path.name, storage_path=path.parent.fs_path, storage_filesystem=path.fs,
            callbacks=callbacks, verbose=0,
            # PBT copies other trials' checkpoints: keeping one per trial let a best trial's
            # latest checkpoint be deleted under it (seen once in a full test run)
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=None if strategy.name == "pbt" else 1),
            failure_config=tune.FailureConfig(max_failures=t.max_failures)))


def _paths(spec: SweepSpec, resume: bool) -> tuple[StoragePath, dict[str, Any]]:
    """The sweep's folder: a new one, or on --resume the one the state file names, which
    must be a folder directly under the spec's folder in the storage (never a path elsewhere:
    restoring unpickles what is there)."""
    state_file = _state_path(spec)
    if resume:
        if not state_file.is_file():
            raise RungwiseError(f"--resume: no earlier sweep of {spec.name!r} under "
                                f"{state_file.parent.shown}; run `rungwise tune` without "
                                "--resume")
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            raise RungwiseError(f"--resume: {state_file.shown} is not JSON; delete it or run "
                                "without --resume") from None
        path = child_of(state_file.parent, state.get("experiment_path"))
        if not tune.Tuner.can_restore(path.fs_path, storage_filesystem=path.fs):
            raise RungwiseError(f"--resume: {path.shown} holds no restorable sweep")
        return path, state
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return state_file.parent / f"sweep-{stamp}", {}


def run_sweep(spec: SweepSpec, *, resume: bool = False, address: str | None = None,
              register: bool = True, tracking: bool = True, quiet: bool = False,
              run_tags: dict[str, str] | None = None,
              warm_start: list[dict[str, Any]] | None = None) -> SweepResult:
    """Run (or resume) the sweep of ``spec``; ``warm_start`` configs are tried first."""
    validate_space(spec)
    build_strategy(spec, warm_start)  # the space's errors before anything is read
    uri = resolve_tracking_uri(spec.tracking.uri) if tracking else None
    if uri:
        check_reachable(uri)
    path, state = _paths(spec, resume)
    raw = split_data(spec.data)  # data errors before Ray starts
    # tune.pack: auto on a CPU weighs the sweep's work, which needs the training rows
    size = pack_size(spec, len(raw.train))
    strategy = build_strategy(spec, warm_start, pack=size)
    # imputation + encoding and the tracking store's first open (SQLite migrations) overlap
    # with ray.init; leaving the block waits for the thread even when ray.init fails, so a
    # migration is never cut off half-way
    with ThreadPoolExecutor(1, thread_name_prefix="rungwise-prep") as pool:
        prep = pool.submit(_prepare_and_open_store, spec, raw, uri)
        init_ray(address)
        settled, cluster = _gpus(spec)
        _check_fits(spec.resources, settled, cluster)
        preflight(path.storage)  # every node reads and writes the storage, or nothing starts
        local = prep.result()
        check_sweep_fits(spec, list(local.values()))  # memory: before any trial or run
    # trials (and the driver's evaluation) use the settled values; the parent run records
    # the spec as written, so that it reproduces on another cluster
    written, spec = spec, spec.with_overrides(settled.overrides())
    refs = share_data(local)
    _check_model_kinds(spec, next(iter(local.values()), None))
    shared = Shared(spec=spec, prepared=refs, raw=ray.put(raw),
                    checkpoint_every=strategy.checkpoint_every, storage_path=str(path.parent))
    parent = ParentRun.open(uri, written, strategy, raw, state.get("parent_run_id"), run_tags) \
        if uri else None
    _save_state(spec, path, parent, uri)
    logger = RunLogger(uri) if uri else None
    tracker = SweepTracker(logger, parent.experiment_id, parent.run_id, spec.tune.metric,
                           spec.train.epochs) \
        if logger and parent else None
    if tracker is not None:  # ASHA's rungs explain the trials it stops (tuning/rungs.py)
        tracker.scheduler, tracker.mode = strategy.scheduler, spec.tune.mode
        tracker.dataset_input = parent.dataset_input if parent else None
    progress = ProgressCallback(spec, strategy, quiet=quiet)
    # Tune's default loggers write each result three times per trial (JSON, CSV and a
    # TensorBoard event file, with a writer thread per trial) from the driver, whose CPU
    # the trials then lack; result.json is what rungwise reads back, so only it is kept.
    # TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0 in the environment brings the others back.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    live = [Live(f"{path}#progress", progress), Live(f"{path}#janitor", PgJanitor())] + (
        [Live(f"{path}#mlflow", MlflowSweepCallback(tracker))] if tracker else [])
    # ``size`` came from the spec as written, as the searcher's limit did (settling resolves
    # train.device: auto; auto packing reads cuda only where the spec says it)
    trainable, packs = _trainable(spec, shared), None
    if size > 1:  # tune.pack: trials relay a pack's members (tuning/packed_trial.py)
        trainable, packs = packed_trainable(spec, shared, size)
        live.append(Live(f"{path}#packs", PackLeaver(packs)))
    callbacks: list[Any] = [*live[:2], JsonLoggerCallback(), *live[2:]]
    try:
        tuner = _tuner(spec, strategy, trainable, path, callbacks, resume, size)
        grid = tuner.fit()
        if progress.interrupted():
            raise KeyboardInterrupt
        result = _finish(spec, strategy, grid, raw, local, parent, tracker, uri, register)
        result.experiment_path = str(path)
        return result
    except BaseException as exc:
        if tracker is not None:
            tracker.end_all("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        if parent is not None:
            parent.end(exc)
        raise
    finally:
        for cb in live:
            cb.release()
        if packs is not None:  # the registry and any pack left: not kept by the driver's Ray
            close_packs(packs)
        if logger is not None:
            logger.close()


def _save_state(spec: SweepSpec, path: StoragePath, parent: ParentRun | None,
                uri: str | None) -> None:
    """What ``--resume`` reads back: the Tune experiment and the parent run. The tracking URI
    is not stored (it may hold a password): a resume resolves it again from the spec and
    ``MLFLOW_TRACKING_URI``, as the first run did."""
    state_file = _state_path(spec)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({
        "experiment_path": str(path), "parent_run_id": parent.run_id if parent else None,
        "tracking": uri is not None, "spec": spec.name}, indent=2))


def _finish(spec: SweepSpec, strategy: Strategy, grid: Any, raw: SplitData,
            local: dict[str, Prepared], parent: ParentRun | None,
            tracker: SweepTracker | None, uri: str | None, register: bool) -> SweepResult:
    best = best_trial(grid, spec.tune.metric, spec.tune.mode)
    evaluated = evaluate_best(spec, best, raw, local)
    out = SweepResult(parent_run_id=parent.run_id if parent else None, strategy=strategy.name,
                      reason=strategy.reason, best_overrides=evaluated.overrides,
                      best_value=evaluated.value, test_metrics=evaluated.test_metrics,
                      trials=[], tracking_uri=uri)
    if tracker is not None:
        tracker.logger.flush()
    if parent is not None and tracker is not None:
        out.trials = parent.summarise(grid, tracker, evaluated)
        out.model_uri = registry.log_bundle(parent.run_id, evaluated.bundle,
                                            evaluated.example, parent.uri)
        if register and spec.tracking.register_as:
            out.version, out.aliases = registry.register(parent.uri, out.model_uri,
                                                         spec.tracking.register_as,
                                                         parent.run_id)
            parent.client.set_tag(parent.run_id, "rungwise.registered_version",
                                  f"{spec.tracking.register_as}/{out.version}")
        parent.end(None)
    return out


class PgJanitor(tune.Callback):
    """Workaround for ray#54305: when a scheduler stops a multi-worker trial, Ray 2.60 can
    leave its workers' placement group reserved until the driver exits, and later trials
    starve. Workers report their group's id; when the trial ends, the driver removes it."""

    def __init__(self) -> None:
        self.groups: dict[str, str] = {}
        self.removed: list[str] = []

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        if result.get("pg_id"):
            self.groups[trial.trial_id] = str(result["pg_id"])

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        self._remove(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._remove(trial.trial_id)

    def _remove(self, trial_id: str) -> None:
        pg_hex = self.groups.pop(trial_id, None)
        if pg_hex is None:
            return
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
            self.removed.append(pg_hex)
        except Exception:  # already removed by Ray Train: nothing leaked
            pass
