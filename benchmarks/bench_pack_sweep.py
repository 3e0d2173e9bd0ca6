"""Whole-sweep wall time, packed (``tune.pack: N``) vs unpacked, the same spec, in one process.

The sweep: the adult MLP (``--models``: [32]/64 by default, [64]/128, the demo's [128, 64]/512,
or all), one torch thread, no early stopping, ``tune.search: random`` over ``train.lr`` and
``model.dropout`` (every trial does the same work), ``--trials`` x ``--epochs`` (default
32 x 20, the size ``tune.pack: auto``'s CPU rule was set from; ``--quick`` 8 x 3). MLflow on:
a fresh SQLite store per sweep.

- ``--device cpu`` (default): ``tune.max_concurrent`` 2 both ways: two trials at a time
  unpacked, two packs of ``--pack`` members packed (each pack holds one CPU, as a trial does).
- ``--device cuda`` (a GPU machine): one trial per GPU (``gpus_per_worker: 1``), 8 trials per
  GPU (``gpus_per_worker: 0.125``, fractional), and one pack of ``--pack`` per GPU; the
  ratios are against one trial per GPU (the issue's target: packed 5x). Without a GPU it
  prints a skipped line.

Timed after one untimed warm-up sweep (1 trial, 1 epoch) with Ray already up, the sides
alternating over ``--rounds``; ratio = baseline wall / packed wall (medians of rounds). Wall time
includes everything ``run_sweep`` does: trial start-up (a packed sweep starts one relay process
per trial in flight, plus one per pack and a registry), reporting to Tune, MLflow, and the best
model's evaluation. Trial compute alone is ``bench_pack.py``'s.

Measured on the 2-core build machine, quiet, one round each (unpacked / packed):
16 x 6, [32]/64: 16.4 / 25.1 s (0.66x); 32 x 20: [32]/64 71.2 / 46.1 s (1.54x), [64]/128
49.4 / 44.3 s (1.12x), [128, 64]/512 46.5 / 58.9 s (0.79x). A packed sweep's fixed cost
(~10 s here: 8 relay processes of ~2 s of CPU each on 2 cores) is repaid only by enough trial
compute saved; ``tuning/packed_trial.py``'s ``auto`` rule for CPUs is set from these figures.

Usage: python benchmarks/bench_pack_sweep.py [--quick] [--trials 32] [--epochs 20] [--pack 4]
       [--rounds 1] [--models 32_64|64_128|128x64_512|all] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    adult_spec,
    bench_env,
    check,
    emit,
    json_stdout,
    machine_info,
    quiet,
    say,
    sqlite_uri,
)

MODELS = {"32_64": ([32], 64), "64_128": ([64], 128), "128x64_512": ([128, 64], 512)}
"""name -> (model.hidden, train.batch_size): the issue's three, the demo's last."""


def spec_for(trials: int, epochs: int, side: dict[str, Any], uri: str, model: str) -> Any:
    hidden, batch = MODELS[model]
    return adult_spec({
        "model.hidden": hidden, "train.batch_size": batch, "train.epochs": epochs,
        "train.early_stopping": None, "train.threads": 1, "tune.search": "random",
        "tune.num_samples": trials, "tune.space": {
            "train.lr": {"loguniform": [1e-3, 1e-2]}, "model.dropout": {"uniform": [0.0, 0.2]}},
        "tracking.uri": uri, "tracking.register_as": None, **side})


def sides(device: str, pack: int, gpus: int) -> dict[str, dict[str, Any]]:
    """The sweeps compared, as spec overrides. CPU: unpacked vs packed, two trials / two packs
    at a time, each holding one CPU. GPU: one trial per GPU, 8 trials per GPU at
    ``gpus_per_worker: 0.125`` (fractional), and one pack of ``--pack`` per GPU."""
    if device == "cpu":
        base = {"train.device": "cpu", "resources.gpus_per_worker": 0,
                "resources.cpus_per_worker": 1, "tune.max_concurrent": 2}
        return {"unpacked": {**base, "tune.pack": "off"}, "packed": {**base, "tune.pack": pack}}
    base = {"train.device": "cuda", "resources.cpus_per_worker": 1}
    return {"one_per_gpu": {**base, "tune.pack": "off", "resources.gpus_per_worker": 1,
                            "tune.max_concurrent": gpus},
            "fractional": {**base, "tune.pack": "off", "resources.gpus_per_worker": 0.125,
                           "tune.max_concurrent": 8 * gpus},
            "packed": {**base, "tune.pack": pack, "resources.gpus_per_worker": 1,
                       "tune.max_concurrent": gpus}}


def one_sweep(tmp: Path, name: str, trials: int, epochs: int, side: dict[str, Any],
              model: str) -> float:
    from tuning.sweep import run_sweep

    spec = spec_for(trials, epochs, side, sqlite_uri(tmp, f"{name}.db"), model)
    t0 = time.perf_counter()
    result = run_sweep(spec, quiet=True, register=False)
    wall = time.perf_counter() - t0
    assert len(result.trials) == trials, (name, len(result.trials))
    return wall


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 trials x 3 epochs, 1 round")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pack", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--models", default="32_64",
                        help=f"comma-separated, of {', '.join(MODELS)}; or all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs, args.rounds = 8, 3, 1
    models = list(MODELS) if args.models == "all" else args.models.split(",")
    json_stdout()
    quiet()
    gpus = gpu_count() if args.device == "cuda" else 0
    if args.device == "cuda" and not gpus:
        emit({"bench": "pack_sweep", "device": "cuda", "skipped": "no GPU visible to torch",
              "machine": machine_info()})
        return
    from tuning.sweep import init_ray

    t0 = time.perf_counter()
    init_ray(None)
    say(f"ray.init {time.perf_counter() - t0:.1f} s")
    compared = sides(args.device, args.pack, gpus)
    first = next(iter(compared))
    rows, checks = [], []
    with bench_env("rungwise-bench-pack-sweep-") as tmp:
        one_sweep(tmp, "warmup", 1, 1, compared[first], models[0])
        for model in models:
            walls: dict[str, list[float]] = {name: [] for name in compared}
            for r in range(args.rounds):
                order = list(compared) if r % 2 == 0 else list(reversed(compared))
                for name in order:
                    wall = one_sweep(tmp, f"{model}-{name}{r}", args.trials, args.epochs,
                                     compared[name], model)
                    say(f"{model} round {r} {name}: {wall:.1f} s")
                    walls[name].append(wall)
            med = {name: statistics.median(w) for name, w in walls.items()}
            baseline = "unpacked" if args.device == "cpu" else "one_per_gpu"
            speedup = round(med[baseline] / med["packed"], 3)
            row: dict[str, Any] = {"model": model, "packed_speedup": speedup,
                                   **{f"{n}_s": [round(w, 2) for w in ws]
                                      for n, ws in walls.items()}}
            if "fractional" in med:
                row["fractional_speedup"] = round(med[baseline] / med["fractional"], 3)
            rows.append(row)
            target = 5.0 if args.device == "cuda" else 1.0
            checks.append(check(f"pack_sweep.{args.device}.{model}.wall_speedup",
                                speedup, ">=", target))
    emit({"bench": "pack_sweep", "device": args.device, "gpus": gpus, "trials": args.trials,
          "epochs": args.epochs, "pack": args.pack, "rounds": args.rounds, "models": rows,
          "checks": checks, "machine": machine_info()})


if __name__ == "__main__":
    main()
