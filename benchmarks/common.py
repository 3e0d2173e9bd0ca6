"""Helpers shared by the sweep, search and cold-start benchmarks.

* ``json_stdout()``: stdout carries exactly one JSON line. Everything else (Ray, MLflow, our
  own progress) goes to stderr, at the file-descriptor level so that child processes started
  while a benchmark runs (raylet, workers) inherit stderr as their stdout too.
* ``Probe`` + ``instrument()``: times the phases of ``tuning.sweep.run_sweep`` from the
  outside by wrapping the functions it calls (by module attribute, restored afterwards), and
  records every trial event (start, each reported epoch, completion) in the driver.
* ``CpuMeter``: CPU seconds of this process tree (driver + Ray's processes + trials), the
  noise-robust companion of wall times on a shared machine.
* ``bench_env()``: a temporary directory for a fresh SQLite MLflow store, with
  ``RUNGWISE_STORAGE`` pointed inside it.
* ``check()``: one row of the targets table that ``run_all.py`` prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ADULT = ROOT / "examples" / "adult.yaml"

# The same quieting as the CLI (jobs.cli._quiet) and the tests (tests/conftest.py).
QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_DEDUP_LOGS": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PYTHONWARNINGS": "ignore",
}

_REAL_STDOUT: int | None = None


def say(*parts: Any) -> None:
    """A human-readable line on stderr."""
    print("[bench]", *parts, file=sys.stderr, flush=True)


def json_stdout() -> None:
    """From now on fd 1 is stderr; ``emit`` writes the one JSON line to the real stdout."""
    global _REAL_STDOUT
    if _REAL_STDOUT is not None:
        return
    sys.stdout.flush()
    _REAL_STDOUT = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def emit(result: dict[str, Any]) -> None:
    line = json.dumps(result, default=_jsonable) + "\n"
    if _REAL_STDOUT is None:
        sys.stdout.write(line)
        sys.stdout.flush()
    else:
        os.write(_REAL_STDOUT, line.encode())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def quiet() -> None:
    import logging
    import warnings

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("mlflow", "alembic", "ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def check(metric: str, value: float | None, op: str | None = None,
          target: float | None = None) -> dict[str, Any]:
    """One row of the targets table: ``value op target`` (op is <= or >=); without ``op``
    an information row (no target)."""
    if op is None or target is None:
        return {"metric": metric, "value": r(value, 4), "target": "-", "met": None}
    met = None
    if value is not None:
        met = bool(value <= target) if op == "<=" else bool(value >= target)
    return {"metric": metric, "value": r(value, 4), "target": f"{op} {target:.4g}", "met": met}


@contextlib.contextmanager
def bench_env(prefix: str = "rungwise-bench-") -> Iterator[Path]:
    """A temp dir holding ``mlflow.db`` (not yet created) and ``runs/`` (RUNGWISE_STORAGE)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        tmp = Path(d)
        old = os.environ.get("RUNGWISE_STORAGE")
        os.environ["RUNGWISE_STORAGE"] = str(tmp / "runs")
        try:
            yield tmp
        finally:
            if old is None:
                os.environ.pop("RUNGWISE_STORAGE", None)
            else:
                os.environ["RUNGWISE_STORAGE"] = old


def sqlite_uri(tmp: Path, name: str = "mlflow.db") -> str:
    return f"sqlite:///{(tmp / name).resolve()}"


def adult_spec(overrides: dict[str, Any]) -> Any:
    from jobs.spec import load_spec

    return load_spec(ADULT, overrides=overrides)


# --- instrumentation of run_sweep ---------------------------------------------------------


@dataclass
class Probe:
    """Phase timings (seconds, summed over calls) and trial events, in driver time."""

    phases: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    marks: dict[str, float] = field(default_factory=dict)
    starts: dict[str, float] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    ends: dict[str, float] = field(default_factory=dict)
    cpu_s: float | None = None
    meter: Any = None
    unpatched: list[str] = field(default_factory=list)

    # trial events (called by ProbeCallback / EventCallback in the driver)
    def on_start(self, trial: Any) -> None:
        from tuning.space import decode_config

        self.starts[trial.trial_id] = time.perf_counter()
        self.marks.setdefault("first_trial_start", self.starts[trial.trial_id])
        self.configs[trial.trial_id] = decode_config(trial.config)

    def on_result(self, trial: Any, result: dict[str, Any]) -> None:
        keep = {k: result.get(k) for k in ("epoch", "epoch_time_s", "val_loss", "diverged",
                                          "training_iteration")}
        self.results.append((time.perf_counter(), trial.trial_id, keep))
        self.marks.setdefault("first_result", time.perf_counter())

    def on_end(self, trial: Any) -> None:
        self.ends[trial.trial_id] = time.perf_counter()

    def on_checkpoint(self, trial: Any) -> None:
        """Tune registers a reported checkpoint after the result it came with."""
        for _, tid, res in reversed(self.results):
            if tid == trial.trial_id:
                res["_ckpt"] = True
                break

    # derived numbers
    def epochs_by_trial(self) -> dict[str, int]:
        """Reported epochs per trial (a diverged trial's last report is the epoch that
        diverged: computed, so it counts)."""
        out: dict[str, int] = defaultdict(int)
        for _, tid, _res in self.results:
            out[tid] += 1
        for tid in self.starts:
            out.setdefault(tid, 0)
        return dict(out)

    def best_val_loss(self) -> float | None:
        vals = [float(res["val_loss"]) for _, _, res in self.results
                if res.get("val_loss") is not None and not res.get("diverged")]
        return min(vals) if vals else None

    def trial_stats(self, concurrency: int) -> dict[str, Any]:
        """Where Tuner.fit's wall time goes, from driver-side timestamps."""
        fit_start, fit_end = self.marks.get("tuner_fit_start"), self.marks.get("tuner_fit_end")
        by: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
        for t, tid, res in self.results:
            by[tid].append((t, res))
        train_sum = sum(float(res.get("epoch_time_s") or 0.0) for _, _, res in self.results)
        gaps, launch = [], []
        after_ckpt: dict[bool, list[float]] = {True: [], False: []}
        for tid, rows in by.items():
            rows.sort(key=lambda x: x[0])
            for (t0, prev), (t1, res) in zip(rows, rows[1:], strict=False):
                if res.get("epoch_time_s") is not None:
                    gaps.append(t1 - t0 - float(res["epoch_time_s"]))
                    after_ckpt[bool(prev.get("_ckpt"))].append(gaps[-1])
            if tid in self.starts and rows and rows[0][1].get("epoch_time_s") is not None:
                launch.append(rows[0][0] - self.starts[tid] - float(rows[0][1]["epoch_time_s"]))
        epoch_times = [float(res["epoch_time_s"]) for _, _, res in self.results
                       if res.get("epoch_time_s") is not None]
        out: dict[str, Any] = {
            "trials": len(self.starts), "epochs_reported": len(self.results),
            "train_s_sum": r(train_sum),
            "train_s_per_slot": r(train_sum / concurrency),
            "trial_epoch_s_median": r(median(epoch_times), 4),
            "epoch_gap_overhead_s_median": r(median(gaps), 4),
            "epoch_gap_overhead_s_sum": r(sum(gaps)),
            "checkpoints": sum(1 for _, _, res in self.results if res.get("_ckpt")),
            "epoch_gap_overhead_s_median_after_checkpoint": r(median(after_ckpt[True]), 4),
            "epoch_gap_overhead_s_median_no_checkpoint": r(median(after_ckpt[False]), 4),
            "trial_launch_overhead_s_median": r(median(launch), 4),
            "trial_launch_overhead_s_sum": r(sum(launch)),
        }
        if fit_start is not None and fit_end is not None:
            fit = fit_end - fit_start
            out["tuner_fit_s"] = r(fit)
            out["fit_overhead_s"] = r(fit - train_sum / concurrency)
            first = self.marks.get("first_result")
            if first is not None and self.results:
                out["fit_start_to_first_result_s"] = r(first - fit_start)
            started = self.marks.get("first_trial_start")
            if started is not None:
                out["fit_start_to_first_trial_start_s"] = r(started - fit_start)
            if self.ends:
                out["last_trial_end_to_fit_end_s"] = r(fit_end - max(self.ends.values()))
        return out


_ACTIVE: list[Probe] = []


def _probe() -> Probe | None:
    return _ACTIVE[-1] if _ACTIVE else None


def _callback_classes() -> tuple[type, type]:
    """Built lazily (Ray imports are slow); module-level names so Tune can pickle them."""
    global ProbeCallback, EventCallback
    if ProbeCallback is None:
        from ray.tune import Callback

        from tuning.progress import ProgressCallback

        class _Events:
            def on_trial_start(self, iteration: int, trials: list[Any], trial: Any,
                               **info: Any) -> None:
                super().on_trial_start(iteration, trials, trial, **info)  # type: ignore[misc]
                if (p := _probe()) is not None:
                    p.on_start(trial)

            def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                                result: dict[str, Any], **info: Any) -> None:
                if (p := _probe()) is not None:
                    p.on_result(trial, result)
                super().on_trial_result(iteration, trials, trial, result,  # type: ignore[misc]
                                        **info)

            def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                                  **info: Any) -> None:
                if (p := _probe()) is not None:
                    p.on_end(trial)
                super().on_trial_complete(iteration, trials, trial, **info)  # type: ignore[misc]

            def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                               **info: Any) -> None:
                if (p := _probe()) is not None:
                    p.on_end(trial)
                super().on_trial_error(iteration, trials, trial, **info)  # type: ignore[misc]

            def on_checkpoint(self, iteration: int, trials: list[Any], trial: Any,
                              checkpoint: Any, **info: Any) -> None:
                if (p := _probe()) is not None:
                    p.on_checkpoint(trial)
                super().on_checkpoint(iteration, trials, trial, checkpoint,  # type: ignore[misc]
                                      **info)

        probe_cls = type("ProbeCallback", (_Events, ProgressCallback), {"__module__": __name__})
        event_cls = type("EventCallback", (_Events, Callback), {"__module__": __name__})
        ProbeCallback, EventCallback = probe_cls, event_cls
    return ProbeCallback, EventCallback


ProbeCallback: Any = None
EventCallback: Any = None


def event_callback() -> Any:
    """A plain Tune callback that feeds the active Probe (for the hand-written glue)."""
    return _callback_classes()[1]()


CPU_PHASES = ("ray_init", "tuner_fit")
"""Phases whose CPU time (this process tree) is recorded too, as ``cpu_<name>``."""


def _wrap(probe: Probe, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        meter = probe.meter if name in CPU_PHASES else None
        c0 = meter.seconds() if meter is not None else 0.0
        t0 = time.perf_counter()
        probe.marks.setdefault(f"{name}_start", t0)
        try:
            return fn(*args, **kwargs)
        finally:
            t1 = time.perf_counter()
            probe.phases[name] += t1 - t0
            probe.calls[name] += 1
            probe.marks[f"{name}_end"] = t1
            if meter is not None:
                probe.phases[f"cpu_{name}"] += meter.seconds() - c0

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


@contextlib.contextmanager
def instrument(probe: Probe) -> Iterator[Probe]:
    """Wrap what ``run_sweep`` calls; every wrapped call adds its time to ``probe.phases``.

    Phases (seconds): ray_init, data_read_split, prepare (impute + encode, once per
    imputation variant) and mlflow_store_open (the tracking store's first open: SQLite
    migrations), both in a thread during ray_init (the driver's wait for that thread after
    ray_init, if any, falls in ``other``), object_store_put (every ray.put),
    mlflow_parent_open (experiment + parent run + params + spec.yaml), tuner_fit
    (Tuner.fit), mlflow_callbacks (driver-side work of the MLflow Tune callback: child run
    creation, queueing metrics, end tags), finish (everything after fit: evaluate_best,
    mlflow_flush, mlflow_summarise, mlflow_log_model, mlflow_register, parent end).
    """
    import ray
    from ray import tune

    import tuning.callback as cb
    import tuning.parent as parent
    import tuning.registry as registry
    import tuning.sweep as sweep
    import tuning.tracking as tracking

    probe_cls, _ = _callback_classes()
    patches: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, name: str) -> None:
        space = owner.__dict__ if isinstance(owner, type) else vars(owner)
        if attr not in space:  # renamed by a refactor: time what is left, say what is not
            probe.unpatched.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return
        orig = space[attr]
        patches.append((owner, attr, orig))
        if isinstance(orig, classmethod):
            func = orig.__func__
            setattr(owner, attr, classmethod(_wrap(probe, name, func)))
        else:
            setattr(owner, attr, _wrap(probe, name, orig))

    patch(sweep, "init_ray", "ray_init")
    patch(sweep, "split_data", "data_read_split")
    patch(sweep, "prepare", "prepare")
    patch(sweep, "warm_store", "mlflow_store_open")
    patch(ray, "put", "object_store_put")
    patch(parent.ParentRun, "open", "mlflow_parent_open")
    patch(parent.ParentRun, "summarise", "mlflow_summarise")
    patch(parent.ParentRun, "end", "mlflow_parent_end")
    patch(registry, "log_bundle", "mlflow_log_model")
    patch(registry, "register", "mlflow_register")
    patch(tracking.RunLogger, "flush", "mlflow_flush")
    patch(cb.SweepTracker, "__init__", "mlflow_tracker_init")
    for hook in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error"):
        patch(cb.SweepTracker, hook, "mlflow_callbacks")
    patch(sweep, "evaluate_best", "evaluate_best")
    patch(sweep, "_finish", "finish")
    patch(tune.Tuner, "fit", "tuner_fit")
    patches.append((sweep, "ProgressCallback", sweep.ProgressCallback))
    sweep.ProgressCallback = probe_cls
    _ACTIVE.append(probe)
    try:
        yield probe
    finally:
        _ACTIVE.remove(probe)
        for owner, attr, orig in reversed(patches):
            setattr(owner, attr, orig)


@contextlib.contextmanager
def recording(probe: Probe) -> Iterator[Probe]:
    """Make ``probe`` the one that ``event_callback()`` instances feed."""
    _ACTIVE.append(probe)
    try:
        yield probe
    finally:
        _ACTIVE.remove(probe)


def timed_sweep(spec: Any, **kwargs: Any) -> tuple[Any, float, Probe]:
    """``run_sweep(spec, quiet=True, **kwargs)`` instrumented; (result, wall_s, probe).

    ``probe.cpu_s`` is the CPU time of this process and all its descendants (Ray's GCS,
    raylet, agents and trial workers) spent during the call (``CpuMeter``)."""
    from tuning.sweep import run_sweep

    probe = Probe()
    with instrument(probe), CpuMeter() as meter:
        probe.meter = meter
        t0 = time.perf_counter()
        result = run_sweep(spec, quiet=True, **kwargs)
        wall = time.perf_counter() - t0
    probe.cpu_s = meter.seconds()
    probe.meter = None
    return result, wall, probe


def _proc_cpu(pid: int) -> tuple[tuple[int, int], int, list[int]] | None:
    """((pid, start time), its own user + system CPU ticks, child pids) from /proc.

    Reaped children's times (cutime) are left out: live children are sampled themselves,
    and adding both would count them twice."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
        kids: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    kids.extend(int(x) for x in fh.read().split())
            except OSError:
                continue
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return (pid, int(rest[19])), int(rest[11]) + int(rest[12]), kids


class CpuMeter:
    """CPU seconds spent by a process tree (default: this process and every descendant:
    Ray's GCS, raylet, agents, trial workers) since the meter started.

    A thread samples the tree every ``interval`` seconds, so processes that end in between
    (trial workers) still count up to their last sample (their parent cannot be relied on to
    collect their times: one that ignores SIGCHLD gets none); a process that lives less than
    ``interval`` may be missed. On a machine shared with
    other jobs wall time inflates with the load while CPU time mostly does not: the ``cpu_*``
    numbers are the noise-robust companions of the walls."""

    def __init__(self, root: int | None = None, interval: float = 0.5) -> None:
        import threading

        self.root = root or os.getpid()
        self.interval = interval
        self._tick = os.sysconf("SC_CLK_TCK")
        self._base: dict[tuple[int, int], int] = {}
        self._last: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> dict[tuple[int, int], int]:
        seen: dict[tuple[int, int], int] = {}
        todo = [self.root]
        while todo:
            got = _proc_cpu(todo.pop())
            if got is not None:
                key, ticks, kids = got
                seen[key] = ticks
                todo.extend(kids)
        return seen

    def seconds(self) -> float:
        """CPU seconds since the start (takes a fresh sample)."""
        with self._lock:
            self._last.update(self._sample())
            return sum(v - self._base.get(k, 0) for k, v in self._last.items()) / self._tick

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._last.update(self._sample())

    def __enter__(self) -> CpuMeter:
        import threading

        self._base = self._sample()
        self._last = dict(self._base)
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.seconds()


def phases(probe: Probe, wall: float) -> dict[str, float | None]:
    """The probe's phase times, and ``other`` = wall minus the top-level phases."""
    ph = dict(probe.phases)
    # prepare and mlflow_store_open run in a thread during ray_init, so they are not top-level
    top = ("ray_init", "data_read_split", "object_store_put", "mlflow_parent_open",
           "mlflow_tracker_init", "tuner_fit", "finish")
    out: dict[str, float | None] = {f"{k}_s": r(v) for k, v in sorted(ph.items())}
    out["other_s"] = r(wall - sum(ph.get(k, 0.0) for k in top))
    if probe.cpu_s is not None:
        out["cpu_total_s"] = r(probe.cpu_s)
    if probe.unpatched:
        out["not_timed"] = sorted(set(probe.unpatched))  # type: ignore[assignment]
    return out


# --- machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "cpu_model": cpu_model(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: ver(name) for name in ("torch", "ray", "mlflow", "optuna", "pandas")},
    }
