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

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.challenger import champion_config, refit_challenger, sweep_challenger, warm_configs
from jobs.spec import JobSpec

if TYPE_CHECKING:
    from jobs.drift import Skipped
    from tuning.storage import StoragePath

GATE_METRICS = {  # tune.metric -> (holdout metric for classification, for regression)
    "val_loss": ("test_loss", "test_rmse"),  # test_loss is standardised per model in regression
    "train_loss": ("test_loss", "test_rmse"),
    "val_accuracy": ("test_accuracy", "test_accuracy"),
    "val_rmse": ("test_rmse", "test_rmse"),
}


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


def gate_for(spec: JobSpec) -> Gate:
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


def lock_path(spec: JobSpec) -> StoragePath:
    """``<storage>/<spec name>/retrain.lock``, in the sweep's storage (``tune.storage``, else
    RUNGWISE_STORAGE): every machine that retrains this spec sees the same file."""
    from tuning.storage import spec_folder

    return spec_folder(spec) / "retrain.lock"


@contextmanager
def retrain_lock(spec: JobSpec, wait: bool = False) -> Iterator[StoragePath]:
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

    test = raw.test
    if raw.is_images:
        return pd.DataFrame(test.x.reshape(len(test.x), -1)), test.y
    target = raw.schema.target
    return test.drop(columns=[target]), test[target]


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
    cl.set_registered_model_alias(name, "champion", version)


# --- the retrain ----------------------------------------------------------------------


def retrain(spec: JobSpec, *, wait: bool = False, address: str | None = None,
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


def _retrain_locked(spec: JobSpec, name: str, address: str | None, quiet: bool) -> RetrainResult:
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
        version, run_id = refit_challenger(spec, raw, overrides)
    return _gate(spec, cl, uri, name, raw, (before, version, run_id), warm, blocker)


def _gate(spec: JobSpec, cl: Any, uri: str, name: str, raw: Any,
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


def retrain_command(spec: JobSpec, wait: bool = False, address: str | None = None) -> int:
    """Exit 0 whether promoted or kept: keeping the champion is a successful outcome."""
    from jobs.signals import sigterm_as_interrupt

    sigterm_as_interrupt()  # the scheduler stops a run with SIGTERM
    print(f"rungwise retrain {spec.name}: {spec.schedule.retrain}, gate on "
          f"{gate_for(spec).metric}", flush=True)
    from jobs.drift import note_decision

    r = retrain(spec, wait=wait, address=address)
    if isinstance(r, RetrainResult):
        note_decision(f"{'promoted' if r.decision.promote else 'kept'}: {r.decision.reason}")
    print(report(r) if isinstance(r, RetrainResult) else r.report(), flush=True)
    return 0
