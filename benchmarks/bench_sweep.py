"""Sweep overhead: rungwise's run_sweep vs the ideal, vs MLflow off, vs hand-written glue.

The sweep (issue: bench_sweep): the adult MLP, hidden [128, 64], batch 512, one torch thread
per trial, no early stopping; ``tune.search: random`` over ``train.lr`` and ``model.dropout``
only (so every trial does the same work), 16 trials x 20 epochs, 2 at a time
(``--quick``: 8 x 5). MLflow: a fresh SQLite store in a temp dir; RUNGWISE_STORAGE in it.

Timed in this one fresh process, in this order:

1. ideal: ``trainer.run.train_run`` on the prepared data, no Ray, no MLflow,
   ``torch.set_num_threads(1)``, for a few of the sampled configs (``--ideal-trials``), after
   one untimed 1-epoch warm-up run; ideal_s = mean time per trial x trials / concurrency.
2. cold: ``run_sweep`` with tracking on and registration, the first in this process, so
   ``ray.init()`` runs inside the timed region (imports are not: see bench_coldstart.py).
   wall_incl_startup_s = its wall; wall_excl_startup_s = that minus the measured ray.init.
3. warm, Ray up: the same sweep with tracking off and on, ``--repeats`` pairs, order
   alternated; mlflow_ratio = median(on) / median(off) (target <= 1.05).
4. glue: a Ray Tune function trainable with a plain PyTorch loop over the same tensors
   (handed over with tune.with_parameters) + ``ray.air.integrations.mlflow.
   MLflowLoggerCallback`` with default settings, once with ``reuse_actors=False`` (Tune's
   default) and once with ``reuse_actors=True``; same trials, epochs and concurrency, and
   ``torch.set_num_threads(1)`` in each trial (Ray also sets OMP_NUM_THREADS=1 for 1-CPU
   trials; the value a trial saw is reported). It runs in the Ray instance already up, so its
   wall excludes start-up; ``*_incl_startup`` ratios add this process's measured ray.init.

The JSON line's ``breakdown`` says where the cold sweep's wall went (see README.md).

Usage: python benchmarks/bench_sweep.py [--quick] [--trials 16] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import check, r, say  # noqa: E402

LR, DROPOUT = (1e-4, 3e-3), (0.0, 0.3)


def sweep_overrides(trials: int, epochs: int, concurrency: int, uri: str,
                    seed: int = 0) -> dict[str, Any]:
    return {
        "model.hidden": [128, 64], "model.activation": "relu",
        "train.batch_size": 512, "train.threads": 1, "train.device": "cpu",
        "train.early_stopping": None, "train.lr_schedule": "none", "train.epochs": epochs,
        "train.seed": seed,
        "tune.search": "random", "tune.num_samples": trials, "tune.max_concurrent": concurrency,
        "tune.space": {"train.lr": {"loguniform": list(LR)},
                       "model.dropout": {"uniform": list(DROPOUT)}},
        "tracking.uri": uri, "tracking.register_as": "bench-sweep",
    }


def sample_configs(n: int, seed: int) -> list[dict[str, float]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"train.lr": float(np.exp(rng.uniform(np.log(LR[0]), np.log(LR[1])))),
             "model.dropout": float(rng.uniform(*DROPOUT))} for _ in range(n)]


# --- 1. the ideal -------------------------------------------------------------------------


def ideal(spec: Any, configs: list[dict[str, float]], trials: int,
          concurrency: int) -> dict[str, Any]:
    import torch

    from trainer.pipeline import prepare, split_data
    from trainer.run import train_run

    torch.set_num_threads(1)
    prepared = prepare(split_data(spec.data), spec.impute)
    warm = spec.with_overrides({**configs[0], "train.epochs": 1})
    train_run(warm.model, warm.train, prepared)  # first-call costs (lazy imports, allocator)
    times, cpus, epochs = [], [], 0
    for cfg in configs:
        s = spec.with_overrides(cfg)
        c0, t0 = time.process_time(), time.perf_counter()
        result = train_run(s.model, s.train, prepared)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        epochs = result.fit.epochs_run
        say(f"ideal: lr={cfg['train.lr']:.2e} dropout={cfg['model.dropout']:.2f}: "
            f"{times[-1]:.2f} s ({cpus[-1]:.2f} s CPU) for {epochs} epochs")
    per_trial = sum(times) / len(times)
    cpu_trial = sum(cpus) / len(cpus)
    return {"ideal_s": r(per_trial * trials / concurrency), "ideal_trial_s": r(per_trial),
            "ideal_epoch_s": r(per_trial / max(epochs, 1), 4), "ideal_trials_timed": len(times),
            "ideal_cpu_s": r(cpu_trial * trials),
            "ideal_cpu_over_wall": r(cpu_trial / per_trial),
            "rows_train": len(prepared.x_train), "features": int(prepared.x_train.shape[1])}


# --- 4. the hand-written glue -------------------------------------------------------------


def glue_trainable(config: dict[str, Any], data: dict[str, Any]) -> None:
    """What people write: a plain loop over in-memory tensors, one report per epoch."""
    import os
    import time

    import torch
    import torch.nn.functional as F
    from ray import tune
    from torch import nn

    torch.set_num_threads(1)
    x, y, xv, yv = data["x"], data["y"], data["xv"], data["yv"]
    torch.manual_seed(0)
    p = config["dropout"]
    model = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Dropout(p),
                          nn.Linear(128, 64), nn.ReLU(), nn.Dropout(p), nn.Linear(64, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4)
    threads = f"{torch.get_num_threads()}/{os.environ.get('OMP_NUM_THREADS')}"
    for epoch in range(1, data["epochs"] + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 512):
            idx = perm[i:i + 512]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(xv)
            val_loss = F.cross_entropy(out, yv).item()
            acc = (out.argmax(-1) == yv).float().mean().item()
        tune.report({"epoch": epoch, "val_loss": val_loss, "val_accuracy": acc,
                     "epoch_time_s": time.perf_counter() - t0, "threads": threads})


def glue(prepared: Any, trials: int, epochs: int, concurrency: int, uri: str,
         reuse: bool, seed: int) -> tuple[float, common.Probe, str]:
    import torch
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    data = {"x": torch.as_tensor(prepared.x_train),
            "y": torch.as_tensor(prepared.y_train).long(),
            "xv": torch.as_tensor(prepared.x_val),
            "yv": torch.as_tensor(prepared.y_val).long(), "epochs": epochs}
    name = f"glue-reuse-{reuse}".lower()
    probe = common.Probe()
    with common.recording(probe):
        t0 = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(glue_trainable, data=data), {"CPU": 1}),
            param_space={"lr": tune.loguniform(*LR), "dropout": tune.uniform(*DROPOUT)},
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=trials,
                                        max_concurrent_trials=concurrency,
                                        reuse_actors=reuse,
                                        search_alg=_seeded_random(seed)),
            run_config=tune.RunConfig(
                name=name, storage_path=os.environ["RUNGWISE_STORAGE"], verbose=0,
                callbacks=[MLflowLoggerCallback(tracking_uri=uri, experiment_name=name),
                           common.event_callback()]))
        probe.marks["tuner_fit_start"] = time.perf_counter()
        grid = tuner.fit()
        probe.marks["tuner_fit_end"] = time.perf_counter()
        wall = time.perf_counter() - t0
    errors = [str(res.error).splitlines()[0] for res in grid if res.error is not None]
    if errors:
        raise RuntimeError(f"glue ({name}): {len(errors)} trials failed: {errors[0]}")
    seen = sorted({str(res.metrics.get("threads")) for res in grid})
    return wall, probe, ",".join(seen)


def _seeded_random(seed: int) -> Any:
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="8 trials x 5 epochs, 1 repeat, 2 ideal trials (< 3 min)")
    parser.add_argument("--trials", type=int, default=None, help="default 16 (quick 8)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (quick 5)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None,
                        help="warm tracking on/off pairs (default 2, quick 1)")
    parser.add_argument("--ideal-trials", type=int, default=None,
                        help="configs trained for the ideal (default 4, quick 2)")
    parser.add_argument("--no-glue", action="store_true", help="skip the hand-written glue")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    trials = args.trials or (8 if args.quick else 16)
    epochs = args.epochs or (5 if args.quick else 20)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    n_ideal = args.ideal_trials or (2 if args.quick else 4)
    conc = args.concurrency

    common.json_stdout()
    common.quiet()
    import ray  # noqa: F401  (imports outside every timed region)
    import torch  # noqa: F401

    import tuning.sweep  # noqa: F401

    out: dict[str, Any] = {"bench": "sweep", "quick": args.quick, "trials": trials,
                           "epochs": epochs, "concurrency": conc, "threads_per_trial": 1}
    with common.bench_env("rungwise-bench-sweep-") as tmp:
        uri = common.sqlite_uri(tmp)
        base = sweep_overrides(trials, epochs, conc, uri, args.seed)
        spec = common.adult_spec(base)

        say(f"1/4 ideal: {n_ideal} of {trials} trials x {epochs} epochs, in this process")
        out.update(ideal(spec, sample_configs(n_ideal, args.seed), trials, conc))
        ideal_s = out["ideal_s"]

        say("2/4 cold: run_sweep, tracking on, ray.init inside the timed region")
        res, wall, probe = common.timed_sweep(spec.with_overrides({"name": "bench-sweep-cold"}))
        ray_init = probe.phases.get("ray_init", 0.0)
        excl = wall - ray_init
        cpu_excl = (probe.cpu_s or 0.0) - probe.phases.get("cpu_ray_init", 0.0)
        say(f"cold sweep: {wall:.1f} s (ray.init {ray_init:.1f} s), ideal {ideal_s:.1f} s; "
            f"CPU {probe.cpu_s:.1f} s vs ideal {out['ideal_cpu_s']:.1f} s")
        out.update({
            "wall_incl_startup_s": r(wall), "wall_excl_startup_s": r(excl),
            "ratio_incl_startup": r(wall / ideal_s), "ratio_excl_startup": r(excl / ideal_s),
            "cpu_ratio_incl_startup": r((probe.cpu_s or 0.0) / out["ideal_cpu_s"]),
            "cpu_ratio_excl_startup": r(cpu_excl / out["ideal_cpu_s"]),
            "best_val_loss": r(res.best_value, 5),
            "breakdown": {**common.phases(probe, wall), **probe.trial_stats(conc)},
        })

        say(f"3/4 warm: tracking off vs on, {repeats} pair(s), order alternated")
        on, off, cpu_on, cpu_off, fit_on, fit_off = [], [], [], [], [], []
        launch: list[float] = []
        for i in range(repeats):
            order = [False, True] if i % 2 == 0 else [True, False]
            for tracked in order:
                name = f"bench-sweep-{'on' if tracked else 'off'}-{i}"
                _, w, p = common.timed_sweep(spec.with_overrides({"name": name}),
                                             tracking=tracked, register=tracked)
                (on if tracked else off).append(w)
                (cpu_on if tracked else cpu_off).append(p.cpu_s or 0.0)
                (fit_on if tracked else fit_off).append(p.phases.get("tuner_fit", 0.0))
                launch.append(p.trial_stats(conc).get("fit_start_to_first_result_s") or 0.0)
                say(f"warm sweep, tracking {'on ' if tracked else 'off'}: {w:.1f} s, CPU "
                    f"{p.cpu_s:.1f} s (tuner.fit {p.phases.get('tuner_fit', 0):.1f} s, "
                    f"finish {p.phases.get('finish', 0):.1f} s, parent run "
                    f"{p.phases.get('mlflow_parent_open', 0):.1f} s)")
        med = common.median

        def ratio(a: list[float], b: list[float]) -> float | None:
            return r(med(a) / med(b)) if a and b and med(b) else None

        out["mlflow"] = {"tracked_s": [r(x) for x in on], "untracked_s": [r(x) for x in off],
                         "ratio": ratio(on, off),
                         "cost_s": r(med(on) - med(off)) if on and off else None,
                         "tuner_fit_ratio": ratio(fit_on, fit_off),
                         "tracked_cpu_s": [r(x) for x in cpu_on],
                         "untracked_cpu_s": [r(x) for x in cpu_off],
                         "cpu_ratio": ratio(cpu_on, cpu_off),
                         "warm_fit_start_to_first_result_s": [r(x) for x in launch]}
        m_on = med(on)
        out["warm_tracked_ratio_to_ideal"] = r(m_on / ideal_s) if m_on else None

        if not args.no_glue:
            from trainer.pipeline import prepare, split_data

            prepared = prepare(split_data(spec.data), spec.impute)
            out["glue"] = {}
            for reuse in (False, True):
                say(f"4/4 glue: Tune function trainable + MLflowLoggerCallback, "
                    f"reuse_actors={reuse}")
                with common.CpuMeter() as meter:
                    w, p, threads = glue(prepared, trials, epochs, conc, uri, reuse, args.seed)
                cpu = meter.seconds()
                key = "reuse_actors" if reuse else "default"
                out["glue"][key] = {"wall_s": r(w), "ratio_excl_startup": r(w / ideal_s),
                                    "ratio_incl_startup": r((w + ray_init) / ideal_s),
                                    "cpu_s": r(cpu), "cpu_ratio": r(cpu / out["ideal_cpu_s"]),
                                    "trial_threads_seen": threads, **p.trial_stats(conc)}
                say(f"glue {key}: {w:.1f} s = {w / ideal_s:.2f}x ideal (excl. start-up)")

    checks = [check("sweep.ratio_incl_startup", out["ratio_incl_startup"], "<=", 1.5),
              check("sweep.ratio_excl_startup", out["ratio_excl_startup"], "<=", 1.2),
              check("sweep.mlflow_ratio", out["mlflow"]["ratio"], "<=", 1.05)]
    if "glue" in out:
        ours = out["ratio_excl_startup"]
        for key in ("default", "reuse_actors"):
            g = out["glue"][key]["ratio_excl_startup"]
            out["glue"][key]["rungwise_speedup"] = r(g / ours)
        checks.append(check("sweep.glue_reuse_over_rungwise_excl_startup",
                            out["glue"]["reuse_actors"]["rungwise_speedup"], ">=", 1.0))
    out["checks"] = checks
    out["ray_init_s"] = r(ray_init)
    common.emit(out)


if __name__ == "__main__":
    main()
