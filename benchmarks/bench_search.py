"""Search efficiency: ASHA vs full-budget random search on the same configs; TPE vs random.

Adult data, a space with bad corners: ``train.lr`` loguniform [1e-5, 1.0], ``model.hidden``
choice [[8], [64], [256, 128]], ``model.dropout`` uniform [0, 0.5]; 20 epochs, no early
stopping (so random search spends its full budget), batch 512, one thread per trial, 2
trials at a time. Per seed:

* 32 configurations (``--quick``: 16, 9 epochs) are drawn once from a numpy generator
  seeded with the seed and handed to both runs as ``warm_start`` with ``num_samples`` equal
  to their number, so random and ASHA train exactly the same configs (checked: the configs
  each run started are compared and ``same_configs`` says so). ``train.seed`` = the seed.
* random: ``tune.search: random`` (FIFO: every trial runs every epoch).
* asha: ``tune.search: asha``, grace 1, reduction factor 3, max_t = epochs.
* bayes: ``tune.search: bayes`` (Optuna TPE, seeded), the same number of trials, full budget.

All runs: ``tracking=False, register=False`` (this is about search, not MLflow; see
bench_sweep.py for MLflow's cost). ``ray.init`` happens once before any timed run.
``epochs`` = reported epochs summed over trials (a diverged trial's last report is the epoch
that diverged). ``best_val_loss`` = the lowest validation loss any trial reported.

Targets (averaged over the seeds; --quick: 1 seed): ASHA's best within 1% of random's
(``asha_best_gap`` = asha_best / random_best - 1 <= 0.01) using at most a third of the epochs
(``asha_epoch_fraction`` = asha_epochs / random_epochs <= 0.333).

Usage: python benchmarks/bench_search.py [--quick] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import check, r, say  # noqa: E402

LR = (1e-5, 1.0)
HIDDEN = [[8], [64], [256, 128]]
DROPOUT = (0.0, 0.5)
SPACE = {"train.lr": {"loguniform": list(LR)}, "model.hidden": {"choice": HIDDEN},
         "model.dropout": {"uniform": list(DROPOUT)}}


def overrides(n: int, epochs: int, seed: int, search: str) -> dict[str, Any]:
    return {"train.epochs": epochs, "train.early_stopping": None, "train.batch_size": 512,
            "train.threads": 1, "train.device": "cpu", "train.lr_schedule": "none",
            "train.seed": seed, "model.activation": "relu",
            "tune.search": search, "tune.num_samples": n, "tune.max_concurrent": 2,
            "tune.grace_period": 1, "tune.reduction_factor": 3, "tune.space": SPACE,
            "tracking.register_as": None}


def draw_configs(n: int, seed: int) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"train.lr": float(np.exp(rng.uniform(np.log(LR[0]), np.log(LR[1])))),
             "model.hidden": list(HIDDEN[int(rng.integers(len(HIDDEN)))]),
             "model.dropout": float(rng.uniform(*DROPOUT))} for _ in range(n)]


def run(search: str, n: int, epochs: int, seed: int,
        configs: list[dict[str, Any]] | None) -> dict[str, Any]:
    spec = common.adult_spec(overrides(n, epochs, seed, search)).with_overrides(
        {"name": f"bench-search-{search}-{seed}"})
    result, wall, probe = common.timed_sweep(spec, tracking=False, register=False,
                                             warm_start=configs)
    per_trial = probe.epochs_by_trial()
    started = sorted(tuple(sorted((k, str(v)) for k, v in c.items()))
                      for c in probe.configs.values())
    best = probe.best_val_loss()
    out = {"wall_s": r(wall), "epochs": sum(per_trial.values()), "trials": len(per_trial),
           "best_val_loss": r(best, 5), "sweep_best_value": r(result.best_value, 5),
           "diverged": sum(1 for _, _, res in probe.results if res.get("diverged")),
           "strategy": result.strategy, "_configs": started,
           "tune": {k: v for k, v in probe.trial_stats(2).items()
                    if k in ("tuner_fit_s", "train_s_per_slot", "fit_overhead_s",
                             "trial_launch_overhead_s_median", "trial_launch_overhead_s_sum",
                             "epoch_gap_overhead_s_median", "fit_start_to_first_result_s")}}
    say(f"seed {seed} {search:6s}: best val_loss {best:.4f}, {out['epochs']} epochs over "
        f"{out['trials']} trials, {wall:.1f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 configs x 9 epochs, 1 seed")
    parser.add_argument("--configs", type=int, default=None, help="default 32 (quick 16)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (quick 9)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0 1 2 (quick 0)")
    parser.add_argument("--no-bayes", action="store_true")
    args = parser.parse_args()
    n = args.configs or (16 if args.quick else 32)
    epochs = args.epochs or (9 if args.quick else 20)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])

    common.json_stdout()
    common.quiet()
    from tuning.sweep import init_ray

    out: dict[str, Any] = {"bench": "search", "quick": args.quick, "configs": n,
                           "epochs": epochs, "seeds": seeds, "concurrency": 2,
                           "tracking": False, "register": False}
    with common.bench_env("rungwise-bench-search-"):
        t0 = time.perf_counter()
        init_ray(None)
        out["ray_init_s"] = r(time.perf_counter() - t0)
        per_seed = []
        searches = ["random", "asha"] + ([] if args.no_bayes else ["bayes"])
        for i, seed in enumerate(seeds):
            configs = draw_configs(n, seed)
            rot = searches[i % len(searches):] + searches[:i % len(searches)]
            runs = {s: run(s, n, epochs, seed, configs if s != "bayes" else None)
                    for s in rot}
            rnd, asha = runs["random"], runs["asha"]
            row: dict[str, Any] = {
                "seed": seed,
                "same_configs": rnd.pop("_configs") == asha.pop("_configs"),
                **{s: v for s, v in runs.items()},
                "asha_best_gap": r(asha["best_val_loss"] / rnd["best_val_loss"] - 1, 4),
                "asha_epoch_fraction": r(asha["epochs"] / rnd["epochs"], 4),
                "asha_wall_ratio": r(asha["wall_s"] / rnd["wall_s"], 3),
            }
            if "bayes" in runs:
                runs["bayes"].pop("_configs")
                row["bayes_best_gap"] = r(runs["bayes"]["best_val_loss"]
                                          / rnd["best_val_loss"] - 1, 4)
                row["bayes_wall_ratio"] = r(runs["bayes"]["wall_s"] / rnd["wall_s"], 3)
            per_seed.append(row)

    def mean(key: str, sub: str | None = None) -> float | None:
        vals = [(row[key][sub] if sub else row[key]) for row in per_seed
                if (row.get(key) is not None)]
        return r(statistics.fmean(vals), 4) if vals else None

    out["per_seed"] = per_seed
    out["same_configs"] = all(row["same_configs"] for row in per_seed)
    for s in ("random", "asha", "bayes"):
        if s in per_seed[0]:
            out[s] = {"best_val_loss": mean(s, "best_val_loss"), "epochs": mean(s, "epochs"),
                      "wall_s": mean(s, "wall_s")}
    out["asha_best_gap"] = mean("asha_best_gap")
    out["asha_epoch_fraction"] = mean("asha_epoch_fraction")
    out["asha_wall_ratio"] = mean("asha_wall_ratio")
    out["asha_within_1pct_every_seed"] = all(row["asha_best_gap"] <= 0.01 for row in per_seed)
    checks = [check("search.asha_best_gap", out["asha_best_gap"], "<=", 0.01),
              check("search.asha_epoch_fraction", out["asha_epoch_fraction"], "<=", 1 / 3),
              check("search.asha_wall_ratio (ASHA / random)", out["asha_wall_ratio"])]
    if "bayes" in out:
        out["bayes_best_gap"] = mean("bayes_best_gap")
        out["bayes_wall_ratio"] = mean("bayes_wall_ratio")
        checks.append(check("search.bayes_best_gap (TPE / random - 1)", out["bayes_best_gap"]))
        checks.append(check("search.bayes_wall_ratio (TPE / random)", out["bayes_wall_ratio"]))
    out["checks"] = checks
    common.emit(out)


if __name__ == "__main__":
    main()
