"""Whole-sweep wall time, packed (``tune.pack: N``) vs unpacked, the same spec, in one process.

The sweep: the adult MLP, hidden [32], batch 64 (a model ``pack_pays``), one torch thread,
no early stopping, ``tune.search: random`` over ``train.lr`` and ``model.dropout`` (every
trial does the same work), ``--trials`` x ``--epochs`` (default 16 x 6; ``--quick`` 8 x 3),
``tune.max_concurrent`` 2 both ways: two trials at a time unpacked, two packs of ``--pack``
members packed (each pack holds one CPU, as one trial does). MLflow on: a fresh SQLite store.

Timed after one untimed warm-up sweep (1 trial, 1 epoch) with Ray already up, the two sides
alternating over ``--rounds``; ratio = unpacked wall / packed wall (the median of rounds).
Wall time includes everything ``run_sweep`` does: trial start-up (a packed sweep starts one
relay process per trial in flight, plus one per pack and a registry), reporting to Tune,
MLflow, and the best model's evaluation. Trial compute alone is ``bench_pack.py``'s.

Measured on the 2-core build machine (shared, load average 8-25), defaults: unpacked / packed
wall 25.5 / 40.3 s and 53.0 / 65.1 s (two rounds, ratio 0.75); single rounds before gave
0.48 (``--pack 8``) and 2.36 (an unlucky unpacked round). At this size the sweep's fixed costs
(a Ray worker process per relay in flight, ~2-3 s of CPU each, started two at a time on two
cores; Tune's per-result round trip; MLflow) outweigh the ~8 s of trial compute packing saves.

Usage: python benchmarks/bench_pack_sweep.py [--quick] [--trials 16] [--epochs 6] [--pack 4]
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

HIDDEN, BATCH = [32], 64


def spec_for(trials: int, epochs: int, pack: int | str, uri: str) -> Any:
    return adult_spec({
        "model.hidden": HIDDEN, "train.batch_size": BATCH, "train.epochs": epochs,
        "train.early_stopping": None, "train.threads": 1, "tune.search": "random",
        "tune.num_samples": trials, "tune.max_concurrent": 2, "tune.pack": pack,
        "tune.space": {"train.lr": {"loguniform": [1e-3, 1e-2]},
                       "model.dropout": {"uniform": [0.0, 0.2]}},
        "tracking.uri": uri, "tracking.register_as": None})


def one_sweep(tmp: Path, name: str, trials: int, epochs: int, pack: int | str) -> float:
    from tuning.sweep import run_sweep

    spec = spec_for(trials, epochs, pack, sqlite_uri(tmp, f"{name}.db"))
    t0 = time.perf_counter()
    result = run_sweep(spec, quiet=True, register=False)
    wall = time.perf_counter() - t0
    assert len(result.trials) == trials, (name, len(result.trials))
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 trials x 3 epochs, 1 round")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pack", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs, args.rounds = 8, 3, 1
    json_stdout()
    quiet()
    from tuning.sweep import init_ray

    t0 = time.perf_counter()
    init_ray(None)
    say(f"ray.init {time.perf_counter() - t0:.1f} s")
    walls: dict[str, list[float]] = {"unpacked": [], "packed": []}
    with bench_env("rungwise-bench-pack-sweep-") as tmp:
        one_sweep(tmp, "warmup", 1, 1, "off")
        for r in range(args.rounds):
            order = ["unpacked", "packed"] if r % 2 == 0 else ["packed", "unpacked"]
            for side in order:
                pack: int | str = args.pack if side == "packed" else "off"
                wall = one_sweep(tmp, f"{side}{r}", args.trials, args.epochs, pack)
                say(f"round {r} {side}: {wall:.1f} s")
                walls[side].append(wall)
    unpacked, packed = statistics.median(walls["unpacked"]), statistics.median(walls["packed"])
    ratio = unpacked / packed
    name = f"pack_sweep.{'x'.join(map(str, HIDDEN))}_{BATCH}"
    emit({"bench": "pack_sweep", "hidden": HIDDEN, "batch_size": BATCH, "trials": args.trials,
          "epochs": args.epochs, "pack": args.pack, "max_concurrent": 2,
          "rounds": args.rounds, "unpacked_s": [round(w, 2) for w in walls["unpacked"]],
          "packed_s": [round(w, 2) for w in walls["packed"]],
          "checks": [check(f"{name}.wall_speedup", ratio, ">=", 1.0)],
          "machine": machine_info()})


if __name__ == "__main__":
    main()
