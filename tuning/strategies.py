"""The one place where `tune.search` becomes Ray Tune searcher + scheduler objects.

Nothing is re-implemented: grid and random are Ray's variant generator, Bayesian is Optuna's
TPE (``OptunaSearch``), and early stopping of poor settings is Ray's ASHA (Li et al. 2020),
HyperBand (Li et al. 2017), the median stopping rule (Golovin et al. 2017) and PBT
(Jaderberg et al. 2017). BOHB proper (``TuneBOHB``) needs hpbandster and ConfigSpace, which
are unmaintained; ``bohb`` here is TPE + HyperBand, the same idea (a model proposes, bandit
early stopping disposes), with Optuna's TPE in place of BOHB's KDE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
    TrialScheduler,
)
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from tuning.config import SweepSpec
from tuning.errors import RungwiseError
from tuning.packed_trial import pack_size
from tuning.space import build_param_space, grid_size

EPOCH = "training_iteration"


@dataclass
class Strategy:
    name: str
    """The strategy actually run (``auto`` resolved)."""
    reason: str
    param_space: dict[str, Any]
    num_samples: int
    search_alg: Searcher | BasicVariantGenerator | None
    scheduler: TrialScheduler
    checkpoint_every: int
    """Epochs between checkpoints: 1 where the scheduler pauses or clones trials."""


def choose_auto(num_samples: int, epochs: int) -> tuple[str, str]:
    """The lecture's advice: pick the search from the budget."""
    if num_samples <= 4:
        return "random", (f"{num_samples} evaluations are very few: too few to fit a model of "
                          "the space, so random search")
    if num_samples <= 32 and epochs >= 10:
        return "asha", (f"{num_samples} long evaluations ({epochs} epochs each): stop poor "
                        "settings early with ASHA")
    if num_samples <= 200:
        return "bayes", (f"{num_samples} evaluations is a moderate number: Bayesian "
                         "optimisation (TPE) chooses each next setting adaptively")
    return "random", (f"{num_samples} evaluations are many: random search covers the space "
                      "as well as a model would, at no cost")


def _warm_points(space: dict[str, Any], warm_start: list[dict[str, Any]] | None
                 ) -> list[dict[str, Any]]:
    """Earlier best configurations, restricted to this space, encoded like the space."""
    from tuning.space import _encode

    points = []
    for cfg in warm_start or []:
        point = {k: _encode(v) for k, v in cfg.items() if k in space}
        if len(point) == len(space) and point not in points:
            points.append(point)
    return points


def build_strategy(spec: SweepSpec, warm_start: list[dict[str, Any]] | None = None,
                   pack: int | None = None) -> Strategy:
    """Searcher + scheduler for ``spec.tune``; ``warm_start`` configs are tried first.
    ``pack``: trials per pack as the sweep decided it (``pack_size``), to limit trials in
    flight to ``max_concurrent`` packs; ``pack_size(spec)`` without it."""
    tune_spec, epochs = spec.tune, spec.train.epochs
    pack = pack_size(spec) if pack is None else pack
    name: str = tune_spec.search
    reason = f"tune.search: {tune_spec.search}"
    if name == "auto":
        name, reason = choose_auto(tune_spec.num_samples, epochs)
    space = tune_spec.space
    if name == "grid":
        params = build_param_space(space, grid=True)
        return Strategy(name, reason + f" ({grid_size(space)} combinations, each run once)",
                        params, 1, None, FIFOScheduler(), 0)
    params = build_param_space(space)
    points = _warm_points(space, warm_start)
    searcher: Any = None
    if name in ("bayes", "bohb") or (name == "asha" and tune_spec.num_samples > 32):
        if any("grid" in d for d in space.values()):
            raise RungwiseError(f"tune.space: {name} cannot search 'grid' dimensions; "
                                "use choice")
        searcher = ConcurrencyLimiter(
            OptunaSearch(seed=spec.train.seed, points_to_evaluate=points or None),
            max_concurrent=tune_spec.max_concurrent * pack)
    else:
        searcher = BasicVariantGenerator(points_to_evaluate=points or None,
                                         max_concurrent=tune_spec.max_concurrent * pack,
                                         random_state=spec.train.seed)
    scheduler, every = _scheduler(name, spec, params)
    return Strategy(name, reason, params, tune_spec.num_samples, searcher, scheduler, every)


def _scheduler(name: str, spec: SweepSpec, params: dict[str, Any]) -> tuple[TrialScheduler, int]:
    t, epochs = spec.tune, spec.train.epochs
    common: dict[str, Any] = {"time_attr": EPOCH}  # metric and mode come from TuneConfig
    if name in ("grid", "random", "bayes"):
        return FIFOScheduler(), 0
    if name == "asha":
        return ASHAScheduler(max_t=epochs, grace_period=min(t.grace_period, epochs),
                             reduction_factor=t.reduction_factor, **common), 0
    if name in ("hyperband", "bohb"):
        return HyperBandScheduler(max_t=epochs, reduction_factor=t.reduction_factor,
                                  stop_last_trials=True, **common), 1
    if name == "median":
        return MedianStoppingRule(grace_period=min(t.grace_period, epochs),
                                  min_samples_required=3, **common), 0
    if name == "pbt":
        return _pbt(spec, params, common), 1
    raise RungwiseError(f"tune.search: unknown strategy {name!r}")


def _pbt(spec: SweepSpec, params: dict[str, Any], common: dict[str, Any]) -> TrialScheduler:
    """PBT perturbs the train.* values of running trials; model shape cannot change mid-run."""
    mutable = {k: v for k, v in params.items() if k.startswith("train.")}
    if not mutable:
        raise RungwiseError("tune.space: pbt needs at least one train.* dimension to mutate "
                            "(e.g. train.lr)")
    interval = max(1, spec.train.epochs // 4)
    return PopulationBasedTraining(perturbation_interval=interval, hyperparam_mutations=mutable,
                                   synch=False, **common)
