"""`rungwise retrain`: train a challenger on the new data; promote it only if it beats the champion.

The order is what makes a retrain safe to run unattended:

1. a lock, so two retrains of one spec never both promote;
2. the data is read and validated, so a broken file changes nothing in the registry;
3. a challenger: ``schedule.retrain: sweep`` runs a sweep warm-started from earlier best
   configurations; ``refit`` trains the champion's configuration once on the new data. Either
   way it is registered with the alias ``challenger`` (``champion`` too if there is none);
4. champion and challenger are scored by the same code (``ModelBundle.evaluate``) on the same
   raw rows: the new data's test split, which neither model trained on;
5. the decision is written to MLflow and printed; promotion, when earned, is the last registry
   write: one ``set_registered_model_alias`` call, so a crash before it leaves the champion.

The lock is a lease file in the storage (``tune.storage``; jobs/lease.py): two retrains started
on two machines against one storage see the same lease, and a crashed holder's lease expires.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from jobs.drift import Skipped
    from tuning.storage import StoragePath

CRASH_HOOK = "RUNGWISE_TEST_CRASH_BEFORE_PROMOTE"
GATE_METRICS = {  # tune.metric -> (holdout metric for classification, for regression)
    "val_loss": ("test_loss", "test_rmse"),  # test_loss is standardised per model in regression
    "train_loss": ("test_loss", "test_rmse"),
    "val_accuracy": ("test_accuracy", "test_accuracy"),
    "val_rmse": ("test_rmse", "test_rmse"),
}
WARM_START_RUNS = 3


@dataclass(frozen=True)
class Gate:
    metric: str
    mode: str
    """``min`` or ``max``: the direction in which the metric gets better."""
    threshold: float
    """``schedule.promote_if_better_by``: the least improvement that promotes."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    champion_score: float | None
    challenger_score: float
    gain: float | None
    """Improvement of the challenger in the metric's direction (positive = better)."""


@dataclass
class RetrainResult:
    name: str
    mode: str
    gate: Gate
    decision: Decision
    champion_before: str | None
    challenger_version: str
    champion_after: str | None
    run_id: str
    holdout_rows: int
    warm_start: list[dict[str, Any]]
    tracking_uri: str


def gate_for(spec: Any) -> Gate:
    classification, regression = GATE_METRICS[spec.tune.metric]
    metric = classification if spec.data.task == "classification" else regression
    mode = "max" if metric == "test_accuracy" else "min"
    return Gate(metric, mode, float(spec.schedule.promote_if_better_by))


def decide(gate: Gate, champion: float | None, challenger: float, *, first_model: bool,
           blocker: str | None = None) -> Decision:
    """Promote only a finite challenger that beats the champion by at least the threshold."""
    def kept(reason: str, gain: float | None = None) -> Decision:
        return Decision(False, reason, champion, challenger, gain)

    if blocker:
        return kept(blocker)
    if not math.isfinite(challenger):
        return kept(f"challenger failed evaluation: {gate.metric} is {challenger}")
    if first_model:
        return Decision(True, "promoted: first model", None, challenger, None)
    if champion is None or not math.isfinite(champion):
        return Decision(True, f"champion failed evaluation on the new holdout ({gate.metric} "
                        f"is {champion}); a working challenger replaces it", champion,
                        challenger, None)
    gain = champion - challenger if gate.mode == "min" else challenger - champion
    if gain > 0 and gain >= gate.threshold:
        return Decision(True, f"challenger better by {gain:.6g} >= promote_if_better_by "
                        f"{gate.threshold:g}", champion, challenger, gain)
    if gain > 0:
        return kept(f"challenger better by only {gain:.6g} < promote_if_better_by "
                    f"{gate.threshold:g}", gain)
    return kept(f"challenger not better ({gate.metric} {challenger:.6g} vs champion "
                f"{champion:.6g})", gain)


# --- lock ------------------------------------------------------------------------------


def lock_path(spec: Any) -> StoragePath:
    """``<storage>/<spec name>/retrain.lock``, in the sweep's storage (``tune.storage``, else
    RUNGWISE_STORAGE): every machine that retrains this spec sees the same file."""
    from tuning.storage import open_storage, safe_name

    return open_storage(spec.tune.storage).path(safe_name(spec.name), "retrain.lock")


@contextmanager
def retrain_lock(spec: Any, wait: bool = False) -> Iterator[StoragePath]:
    """Hold the retrain lease of ``spec`` (see jobs/lease.py); without ``wait``, fail at once."""
    from jobs.lease import LeaseHeld, acquire, describe
    from trainer.errors import UserError

    path = lock_path(spec)
    try:
        lease = acquire(path, wait=wait)
    except LeaseHeld as held:
        raise UserError(f"retrain: another retrain of {spec.name!r} is running (lease "
                        f"{path.shown}, {describe(held.holder)}); wait for it or pass "
                        "--wait") from None
    try:
        yield path
    finally:
        lease.release()


# --- the champion's and earlier sweeps' configurations -------------------------------


def parse_param(text: str) -> Any:
    """An MLflow param (always a string) back to its value: ``"[64, 32]"`` -> ``[64, 32]``."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-05" as text; Python wrote a float
        try:
            return float(value)
        except ValueError:
            return value
    return value


def best_overrides(params: dict[str, str]) -> dict[str, Any]:
    return {k.removeprefix("best."): parse_param(v) for k, v in sorted(params.items())
            if k.startswith("best.")}


def champion_config(cl: Any, name: str) -> dict[str, Any] | None:
    """``best.*`` params of the champion version's source run; None without a champion."""
    try:
        version = cl.get_model_version_by_alias(name, "champion")
    except Exception:  # no registered model or no alias: nothing to start from
        return None
    if not version.run_id:
        return {}
    return best_overrides(cl.get_run(version.run_id).data.params)


def warm_configs(cl: Any, spec: Any, limit: int = WARM_START_RUNS) -> list[dict[str, Any]]:
    """The champion's configuration, then the best of the latest finished sweeps/retrains."""
    out: list[dict[str, Any]] = []
    name = spec.tracking.register_as
    first = champion_config(cl, name) if name else None
    if first:
        out.append(first)
    exp = cl.get_experiment_by_name(spec.tracking.experiment or spec.name)
    runs: list[Any] = []
    for kind in ("sweep", "retrain") if exp is not None else ():
        runs += cl.search_runs([exp.experiment_id], max_results=limit,
                               filter_string=f"tags.`rungwise.kind` = '{kind}' and "
                                             "attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"])
    for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
        config = best_overrides(run.data.params)
        if config and config not in out:
            out.append(config)
    return out[:max(1, min(limit, spec.tune.num_samples))]


# --- challengers ----------------------------------------------------------------------


def sweep_challenger(spec: Any, cl: Any, warm: list[dict[str, Any]], address: str | None,
                     quiet: bool) -> tuple[str, str, str]:
    """A warm-started sweep, registered; -> (version, parent run id, data fingerprint)."""
    from tuning.errors import RungwiseError
    from tuning.sweep import run_sweep

    tags = {"rungwise.kind": "retrain", "rungwise.retrain": "sweep",
            "rungwise.warm_start": json.dumps(warm, default=str)[:5000]}
    result = run_sweep(spec, resume=False, address=address, register=True, tracking=True,
                       quiet=quiet, run_tags=tags, warm_start=warm)
    if result.version is None or result.parent_run_id is None:
        raise RungwiseError("retrain: the sweep registered no model")
    run = cl.get_run(result.parent_run_id)
    return result.version, result.parent_run_id, run.data.tags.get("rungwise.data_fingerprint", "")


def refit_challenger(spec: Any, raw: Any, uri: str, overrides: dict[str, Any]) -> tuple[str, str]:
    """Train ``overrides`` applied to the spec once on ``raw``; log, register -> (version, run)."""
    from trainer.pipeline import prepare
    from trainer.run import train_run
    from tuning import registry
    from tuning.tracking import RunLogger, experiment_id, log_params

    rspec = spec.with_overrides(overrides) if overrides else spec
    prepared = prepare(raw, rspec.impute)
    logger = RunLogger(uri)
    cl = logger.client
    exp = experiment_id(cl, spec.tracking.experiment or spec.name)
    run_id = cl.create_run(exp, run_name=f"refit-{spec.name}", tags={
        "rungwise.kind": "retrain", "rungwise.retrain": "refit",
        "rungwise.data_fingerprint": raw.fingerprint}).info.run_id
    status = "FAILED"
    try:
        log_params(cl, run_id, {**rspec.flat(), **{f"best.{k}": v for k, v in overrides.items()}})
        from tuning.lineage import from_raw, log_training_input

        log_training_input(cl, run_id, from_raw(spec.data, raw))
        result = train_run(rspec.model, rspec.train, prepared,
                           on_epoch=lambda m, _c: logger.metrics(run_id, m, int(m["epoch"])))
        logger.metrics(run_id, result.test_metrics, result.fit.epochs_run)
        logger.flush()
        model_uri = registry.log_bundle(run_id, result.bundle, prepared.example, uri)
        version, _ = registry.register(uri, model_uri, spec.tracking.register_as, run_id)
        status = "FINISHED"
        return version, run_id
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        logger.close()
        cl.set_terminated(run_id, status)


# --- scoring, recording, promotion ------------------------------------------------------


def score(uri: str, name: str, alias: str, rows: Any, y: Any, metric: str) -> float:
    """``metric`` of ``models:/name@alias`` on raw rows; NaN when the model cannot score them."""
    from trainer.preprocessor_state import PreprocessorFormatError
    from tuning.registry import load_bundle

    try:  # an artifact rungwise cannot load safely (an old pickle) scores like a broken one
        bundle = load_bundle(uri, name, alias)
    except PreprocessorFormatError as exc:
        print(f"rungwise: {name}@{alias} cannot be scored: {exc}", file=sys.stderr)
        return math.nan
    try:
        return float(bundle.evaluate(rows, y, prefix="test_").get(metric, math.nan))
    except (ValueError, KeyError, IndexError):  # e.g. a column or class it never saw
        return math.nan


def holdout(raw: Any) -> tuple[Any, Any]:
    """The new data's test split as raw rows and raw targets (images: flattened pixels)."""
    import pandas as pd

    if raw.images is not None:
        test = raw.images["test"]
        return pd.DataFrame(test.x.reshape(len(test.x), -1)), test.y
    target = raw.schema.target
    return raw.splits.test.drop(columns=[target]), raw.splits.test[target]


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6f}"


def record(cl: Any, run_id: str, gate: Gate, d: Decision, versions: tuple[str | None, str],
           rows: int) -> None:
    """The decision on the run; ``promoting`` until the alias has moved."""
    cl.set_tag(run_id, "rungwise.decision", "promoting" if d.promote else "kept")
    for key, value in {"champion_score": _fmt(d.champion_score),
                       "challenger_score": _fmt(d.challenger_score),
                       "margin": _fmt(d.gain), "reason": d.reason[:4000],
                       "gate_metric": f"{gate.metric} ({gate.mode}), >= {gate.threshold:g}",
                       "champion_version": versions[0] or "none",
                       "challenger_version": versions[1], "holdout_rows": str(rows)}.items():
        cl.set_tag(run_id, f"rungwise.{key}", value)


def promote(cl: Any, name: str, version: str) -> None:
    """The one registry write that changes who serves; nothing after it can undo a retrain."""
    if os.environ.get(CRASH_HOOK) == "1":
        raise RuntimeError(f"{CRASH_HOOK}=1: crashing right before promotion (test hook)")
    cl.set_registered_model_alias(name, "champion", version)


# --- the retrain ----------------------------------------------------------------------


def retrain(spec: Any, *, wait: bool = False, address: str | None = None,
            quiet: bool = False) -> RetrainResult | Skipped:
    """Lock, validate the data, train a challenger, gate it, promote it if it earned it."""
    from trainer.errors import UserError

    name = spec.tracking.register_as
    if not name:
        raise UserError("tracking.register_as: retrain needs a registered model name; "
                        "set tracking.register_as in the spec")
    with retrain_lock(spec, wait):
        from jobs.drift import before_retrain  # quality gate; schedule.trigger: drift

        check = before_retrain(spec, name)
        if check.skipped is not None:
            return check.skipped
        result = _retrain_locked(spec, name, address, quiet)
        check.attach(result.run_id, spec)
        return result


def _retrain_locked(spec: Any, name: str, address: str | None, quiet: bool) -> RetrainResult:
    from trainer.pipeline import split_data

    raw = split_data(spec.data)  # a broken file fails here, before the registry is touched
    from tuning.registry import alias_version  # mlflow and torch: only once the data is good
    from tuning.tracking import check_reachable, client, resolve_tracking_uri

    uri = resolve_tracking_uri(spec.tracking.uri)
    check_reachable(uri)
    cl = client(uri)
    before = alias_version(uri, name, "champion")
    blocker, warm = None, []
    if spec.schedule.retrain == "sweep":
        warm = warm_configs(cl, spec)
        version, run_id, seen = sweep_challenger(spec, cl, warm, address, quiet)
        if seen and seen != raw.fingerprint:
            blocker = ("the data changed while the sweep ran (fingerprint "
                       f"{raw.fingerprint} before, {seen} in the sweep); retrain again")
    else:
        overrides = champion_config(cl, name) or {}
        warm = [overrides] if overrides else []
        version, run_id = refit_challenger(spec, raw, uri, overrides)
    return _gate(spec, cl, uri, name, raw, (before, version, run_id), warm, blocker)


def _gate(spec: Any, cl: Any, uri: str, name: str, raw: Any,
          ids: tuple[Any, str, str], warm: list[dict[str, Any]],
          blocker: str | None) -> RetrainResult:
    from tuning.errors import RungwiseError
    from tuning.registry import alias_version

    before, version, run_id = ids
    challenger = alias_version(uri, name, "challenger")
    if challenger is None or str(challenger.version) != version:
        raise RungwiseError(f"registry: {name}@challenger is not the new version {version}; "
                            "another process registered a model meanwhile")
    gate = gate_for(spec)
    rows, y = holdout(raw)
    champion = score(uri, name, "champion", rows, y, gate.metric) if before else None
    d = decide(gate, champion, score(uri, name, "challenger", rows, y, gate.metric),
               first_model=before is None, blocker=blocker)
    before_v = str(before.version) if before else None
    record(cl, run_id, gate, d, (before_v, version), len(rows))
    after = _apply(cl, name, version, run_id, d, first_model=before is None) or before_v
    return RetrainResult(spec.name, spec.schedule.retrain, gate, d, before_v, version, after,
                         run_id, len(rows), warm, uri)


def _apply(cl: Any, name: str, version: str, run_id: str, d: Decision,
           first_model: bool) -> str | None:
    """Move the champion alias when promoted; returns the champion version afterwards."""
    if d.promote and first_model:  # registry.register made the first version champion
        cl.set_tag(run_id, "rungwise.decision", "promoted")
        return version
    if first_model:  # a first model that failed evaluation must not serve
        cl.delete_registered_model_alias(name, "champion")
        return None
    if not d.promote:
        return None
    promote(cl, name, version)
    cl.set_tag(run_id, "rungwise.decision", "promoted")
    return version


# --- the command ----------------------------------------------------------------------


def report(r: RetrainResult) -> str:
    d, g = r.decision, r.gate
    better = "higher" if g.mode == "max" else "lower"
    champ = f"version {r.champion_before}: {_fmt(d.champion_score)}" if r.champion_before \
        else "none before this retrain"
    lines = [f"rungwise retrain {r.name} ({r.mode}): {'PROMOTED' if d.promote else 'KEPT'}",
             f"  holdout     the new data's test split, {r.holdout_rows} rows",
             f"  gate        {g.metric}, {better} is better; promote if better by >= "
             f"{g.threshold:g}",
             f"  champion    {champ}",
             f"  challenger  version {r.challenger_version}: {_fmt(d.challenger_score)}",
             f"  margin      {_fmt(d.gain)}",
             f"  reason      {d.reason}",
             f"  champion is {'version ' + r.champion_after if r.champion_after else 'none'}",
             f"  mlflow      run {r.run_id} (tags rungwise.decision, rungwise.reason)"]
    return "\n".join(lines)


def retrain_command(spec: Any, wait: bool = False, address: str | None = None) -> int:
    """Exit 0 whether promoted or kept: keeping the champion is a successful outcome."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)  # the scheduler stops a run with SIGTERM
    print(f"rungwise retrain {spec.name}: {spec.schedule.retrain}, gate on "
          f"{gate_for(spec).metric}", flush=True)
    from jobs.drift import note_decision

    r = retrain(spec, wait=wait, address=address)
    if isinstance(r, RetrainResult):
        note_decision(f"{'promoted' if r.decision.promote else 'kept'}: {r.decision.reason}")
    print(report(r) if isinstance(r, RetrainResult) else r.report(), flush=True)
    return 0
