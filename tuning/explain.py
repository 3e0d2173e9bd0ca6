"""What a finished sweep says about itself, on its MLflow parent run.

* ``importance.<dotted.path>`` metrics and ``param_importances.png``: fANOVA (Optuna's
  ``FanovaImportanceEvaluator``, seeded) over the trials that produced a value, each scored by
  its best value of ``tune.metric``;
* ``parallel_coordinates.png``: one line per trial across the dimensions that varied,
  coloured by that value;
* ``best_spec.yaml``: the complete spec with the best trial's values filled in, which
  ``rungwise train best_spec.yaml`` runs as it is (secrets masked, like ``spec.yaml``).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import yaml

from tuning.config import SweepSpec
from tuning.secrets import mask_value


@dataclass
class Scored:
    params: dict[str, Any]
    """decoded trial config: ``{"train.lr": 0.01, "model.hidden": [64]}``"""
    value: float


def scored_trials(grid: Any, metric: str, mode: str) -> list[Scored]:
    """Every trial with a usable value of ``metric`` (failed and diverged ones left out)."""
    from tuning.results import _best_value
    from tuning.space import decode_config

    out = []
    for result in grid:
        value = _best_value(result, metric, mode)
        if value is not None and result.config:
            out.append(Scored(decode_config(result.config), float(value)))
    return out


def _label(value: Any) -> Any:
    """A choice as Optuna's categorical accepts it (lists as their JSON text)."""
    return value if value is None or isinstance(value, bool | int | float | str) else (
        json.dumps(value))


def _distribution(dim: dict[str, Any]) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    kind, args = next(iter(dim.items()))
    if kind in ("choice", "grid"):
        return CategoricalDistribution([_label(v) for v in args])
    if kind == "randint":
        return IntDistribution(int(args[0]), int(args[1]) - 1)
    return FloatDistribution(float(args[0]), float(args[1]), log=kind == "loguniform")


def varied(space: dict[str, dict[str, Any]], trials: list[Scored]) -> list[str]:
    """The dimensions whose value differs between the scored trials."""
    return [k for k in space if len({json.dumps(t.params.get(k), default=str)
                                     for t in trials}) > 1]


def importances(space: dict[str, dict[str, Any]], trials: list[Scored],
                mode: str) -> dict[str, float]:
    """fANOVA importance of each varied dimension (sums to 1); {} under 3 trials."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    keys = varied(space, trials)
    if len(trials) < 3 or not keys:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {k: _distribution(space[k]) for k in keys}
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for t in trials:
        params = {k: _label(t.params[k]) for k in keys}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                  value=t.value))
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                  normalize=True)
    return {k: float(found.get(k, 0.0)) for k in keys}


def importance_png(values: dict[str, float], metric: str) -> bytes:
    plt = _pyplot()
    names = sorted(values, key=values.get)  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    ax.set_xlabel(f"importance for {metric} (fANOVA, sums to 1)")
    ax.set_title("Which dimensions of tune.space mattered")
    return _png(fig)


def parallel_png(space: dict[str, dict[str, Any]], trials: list[Scored],
                 metric: str) -> bytes | None:
    """Lines over the varied dimensions (each scaled to [0, 1]), coloured by ``metric``."""
    keys = varied(space, trials)
    if not keys or len(trials) < 2:
        return None
    plt = _pyplot()
    axes_values = [_scaled(space[k], [t.params.get(k) for t in trials]) for k in keys]
    values = [t.value for t in trials]
    lo, hi = min(values), max(values)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(1.8 * len(keys) + 3, 5))
    xs = list(range(len(keys) + 1))
    for i, t in enumerate(trials):
        shade = 0.5 if hi == lo else (t.value - lo) / (hi - lo)
        ys = [axis[0][i] for axis in axes_values] + [shade]
        ax.plot(xs, ys, color=cmap(shade), alpha=0.8)
    for x, (_, ticks) in enumerate(axes_values):
        ax.axvline(x, color="grey", lw=0.8)
        for pos, text in ticks:
            ax.annotate(text, (x, pos), fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.axvline(len(keys), color="grey", lw=0.8)
    ax.set_xticks(xs, [*keys, metric], rotation=20)
    ax.set_yticks([])
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(sm, ax=ax, label=metric)
    ax.set_title("Trials across the dimensions that varied")
    return _png(fig)


def _scaled(dim: dict[str, Any], values: list[Any]) -> tuple[list[float], list[tuple[float, str]]]:
    """Positions in [0, 1] and a few (position, label) ticks for one axis."""
    from tuning.display import short

    kind, args = next(iter(dim.items()))
    if kind in ("choice", "grid"):
        labels = [json.dumps(v) if isinstance(v, list | dict) else str(v) for v in args]
        n = max(len(labels) - 1, 1)
        index = {lab: i / n for i, lab in enumerate(labels)}
        pos = [index.get(json.dumps(v) if isinstance(v, list | dict) else str(v), 0.0)
               for v in values]
        return pos, [(p, lab) for lab, p in index.items()]
    lo, hi = float(args[0]), float(args[1])
    log = kind == "loguniform"
    f = (lambda v: math.log(v)) if log else (lambda v: v)
    span = (f(hi) - f(lo)) or 1.0
    pos = [(f(float(v)) - f(lo)) / span for v in values]
    return pos, [(0.0, short(lo)), (1.0, short(hi))]


def best_spec_yaml(spec: SweepSpec, overrides: dict[str, Any]) -> str:
    """The complete spec of the best trial (``rungwise train`` runs it as it is)."""
    best = spec.with_overrides(overrides).to_dict()
    head = ("# The best trial's spec, written by rungwise tune: run it again with\n"
            "#   rungwise train best_spec.yaml\n")
    return head + yaml.safe_dump(mask_value(best), sort_keys=False)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()
