"""The challenger of a retrain (jobs/retrain.py) and the configurations it starts from.

``schedule.retrain: sweep`` runs a sweep warm-started from the champion's configuration and
the best of the latest sweeps (``warm_configs``); ``refit`` trains the champion's
configuration once on the new data (``tuning.single.tracked_run``, the same tracked run as
``rungwise train``). Either way the model is registered with the alias ``challenger``.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

WARM_START_RUNS = 3


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


def refit_challenger(spec: Any, raw: Any, overrides: dict[str, Any]) -> tuple[str, str]:
    """Train ``overrides`` applied to the spec once on ``raw``; log, register -> (version, run)."""
    from trainer.pipeline import prepare
    from tuning.lineage import from_raw
    from tuning.single import Tracked, tracked_run

    rspec = spec.with_overrides(overrides) if overrides else spec
    how = Tracked(run_name=f"refit-{spec.name}",
                  tags={"rungwise.kind": "retrain", "rungwise.retrain": "refit"},
                  params={f"best.{k}": v for k, v in overrides.items()},
                  dataset=from_raw(spec.data, raw), register_as=spec.tracking.register_as)
    done = tracked_run(rspec, prepare(raw, rspec.impute), how)
    assert done.version is not None
    return done.version, done.run_id
