"""Search spaces and strategies: checked before any trial starts (no Ray instance needed)."""

from __future__ import annotations

import pytest
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
)

from jobs.spec import load_spec
from tests.conftest import EXAMPLES
from tuning.errors import RungwiseError
from tuning.space import (
    TrialConfig,
    build_param_space,
    decode,
    decode_config,
    grid_size,
    impute_variants,
    validate_space,
    variant_key,
)
from tuning.strategies import build_strategy, choose_auto


@pytest.fixture()
def spec():
    return load_spec(EXAMPLES / "adult.yaml")


def with_space(spec, space, **tune):
    return spec.with_overrides({"tune.space": space, **{f"tune.{k}": v for k, v in tune.items()}})


def test_lists_travel_as_json_and_decode_back(spec):
    params = build_param_space({"model.hidden": {"choice": [[64], [128, 64]]}})
    cats = params["model.hidden"].categories
    assert all(isinstance(c, str) for c in cats)
    assert [decode(c) for c in cats] == [[64], [128, 64]]
    assert decode_config({"model.hidden": cats[1], "other": 1}) == {"model.hidden": [128, 64]}


@pytest.mark.parametrize("space,needle", [
    ({"train.lrr": {"choice": [0.1]}}, "tune.space.train.lrr"),
    ({"model.activation": {"choice": ["relu", "swish"]}}, "tune.space.model.activation"),
    ({"model.dropout": {"uniform": [0.0, 1.5]}}, "tune.space.model.dropout"),
    ({"impute.numeric": {"choice": ["mean", "average"]}}, "tune.space.impute.numeric"),
    ({"nosuch.key": {"choice": [1]}}, "tune.space.nosuch.key"),
    ({"tune.num_samples": {"choice": [1, 2]}}, "only data, impute, model and train"),
])
def test_bad_paths_and_values_fail_before_any_trial(spec, space, needle):
    bad = with_space(spec, space)
    with pytest.raises(RungwiseError) as err:
        validate_space(bad)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_grid_needs_discrete_dimensions(spec):
    bad = with_space(spec, {"train.lr": {"loguniform": [1e-4, 1e-2]}}, search="grid")
    with pytest.raises(RungwiseError, match="tune.space.train.lr: grid search needs"):
        build_strategy(bad)


def test_grid_runs_every_combination_once(spec):
    good = with_space(spec, {"train.lr": {"choice": [0.01, 0.001]},
                             "model.hidden": {"grid": [[8], [16], [32]]}}, search="grid")
    strategy = build_strategy(good)
    assert strategy.num_samples == 1
    assert grid_size(good.tune.space) == 6
    assert all("grid_search" in v for v in strategy.param_space.values())


@pytest.mark.parametrize("name,scheduler,searcher", [
    ("random", FIFOScheduler, "BasicVariantGenerator"),
    ("bayes", FIFOScheduler, "ConcurrencyLimiter"),
    ("asha", ASHAScheduler, "BasicVariantGenerator"),
    ("hyperband", HyperBandScheduler, "BasicVariantGenerator"),
    ("bohb", HyperBandScheduler, "ConcurrencyLimiter"),
    ("median", MedianStoppingRule, "BasicVariantGenerator"),
    ("pbt", PopulationBasedTraining, "BasicVariantGenerator"),
])
def test_each_strategy_maps_to_ray_objects(spec, name, scheduler, searcher):
    strategy = build_strategy(spec.with_overrides({"tune.search": name}))
    assert isinstance(strategy.scheduler, scheduler)
    assert type(strategy.search_alg).__name__ == searcher
    assert strategy.name == name


@pytest.mark.parametrize("samples,epochs,expected", [
    (3, 50, "random"), (12, 30, "asha"), (64, 30, "bayes"), (20, 3, "bayes"),
    (500, 10, "random"),
])
def test_auto_follows_the_budget(samples, epochs, expected):
    name, reason = choose_auto(samples, epochs)
    assert name == expected
    assert str(samples) in reason


def test_auto_says_what_it_chose(spec):
    strategy = build_strategy(spec.with_overrides({"tune.search": "auto",
                                                   "tune.num_samples": 12}))
    assert strategy.name == "asha" and "ASHA" in strategy.reason


def test_pbt_needs_a_train_dimension(spec):
    bad = with_space(spec, {"model.hidden": {"choice": [[8], [16]]}}, search="pbt")
    with pytest.raises(RungwiseError, match="pbt needs at least one train"):
        build_strategy(bad)


def test_impute_variants_are_enumerated_once_each(spec):
    variants = impute_variants(spec)
    assert variants == [{"impute.numeric": v} for v in ("mean", "median", "model")]
    keys = {variant_key({**v, "train.lr": 0.1}) for v in variants}
    assert len(keys) == 3
    continuous = with_space(spec, {"impute.drop_columns_above": {"uniform": [0.3, 0.9]}})
    assert impute_variants(continuous) is None


def test_a_trial_config_gives_the_typed_spec_and_its_variant(spec):
    params = build_param_space({"model.hidden": {"choice": [[64], [32, 16]]}})
    config = {"model.hidden": params["model.hidden"].categories[1], "impute.numeric": "mean",
              "train.lr": 0.01, "__trial_index__": 3}
    trial = TrialConfig.of(spec, config)
    assert trial.overrides == {"model.hidden": [32, 16], "impute.numeric": "mean",
                               "train.lr": 0.01}
    assert (trial.spec.model.hidden, trial.spec.impute.numeric, trial.spec.train.lr) == (
        [32, 16], "mean", 0.01)
    assert trial.spec.name == spec.name and spec.model.hidden != [32, 16]
    assert trial.variant == variant_key({"impute.numeric": "mean"})
    assert TrialConfig.of(spec, {}).spec is spec


def test_warm_start_points_are_tried_first(spec):
    warm = [{"train.lr": 0.005, "model.hidden": [64], "model.dropout": 0.1,
             "impute.numeric": "mean"}, {"train.lr": 1.0}]
    strategy = build_strategy(spec.with_overrides({"tune.search": "random"}), warm)
    points = strategy.search_alg._points_to_evaluate
    assert len(points) == 1  # the incomplete one is left out
    assert points[0]["model.hidden"] == "json:[64]"
