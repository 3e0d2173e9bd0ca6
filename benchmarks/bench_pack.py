"""Trial compute, packed vs sequential: 8 trials of one MLP, same process, one torch thread.

Data: the adult demo (examples/adult.yaml) prepared by ``trainer.pipeline`` (~100 float32
columns, ~22,800 training rows). For each model/batch size ([32]/64, [64]/128 and the demo's
[128, 64]/512) two sides train the same 8 members (AdamW, lr 1e-3 .. 1e-2, seeds 0..7,
``--epochs`` epochs, no early stopping), each epoch a shuffled pass plus validation:

- sequential: ``trainer.loop.fit`` once per member, one after another (an unpacked trial);
- packed:     ``trainer.packed.fit_packed`` with the 8 members as one pack.

Both sides run with dropout 0 and again with dropout 0.1 (a packed member draws its own dropout
masks from its own generator, as fit does: N small draws per layer per step). Rounds alternate
the order of the sides; each ratio is the median over rounds of sequential / packed in that
round. The clock is this process's CPU time by default (one thread, so CPU time is the work
and does not inflate when other jobs share the cores); ``--clock wall`` for elapsed time.

``step_vmap_vs_bmm``: one forward + backward of the 8 members on one batch, as
``torch.func.stack_module_state`` + ``vmap(functional_call)`` over the ``build_model``
network / as ``Pack``'s batched weights (``baddbmm`` on one flat parameter); > 1: bmm faster.

Usage: python benchmarks/bench_pack.py [--rounds 3] [--epochs 2] [--clock process|wall]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check, emit, json_stdout, machine_info, say  # noqa: E402

from jobs.spec import load_spec  # noqa: E402
from trainer.config import ModelSpec, TrainSpec  # noqa: E402
from trainer.loop import TensorData, fit  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.packed import Member, Pack, fit_packed, pack_pays  # noqa: E402
from trainer.pipeline import prepare, split_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [([32], 64), ([64], 128), ([128, 64], 512)]
MEMBERS = 8
CLOCK: Callable[[], float] = time.process_time


def load_data() -> TensorData:
    spec = load_spec(ROOT / "examples" / "adult.yaml")
    return TensorData.from_prepared(prepare(split_data(spec.data), spec.impute))


def sides(hidden: list[int], batch: int, dropout: float, epochs: int) -> tuple[Any, ...]:
    model = ModelSpec(kind="mlp", hidden=hidden, activation="relu", dropout=dropout)
    train = TrainSpec(epochs=epochs, batch_size=batch, optimizer="adamw", lr=1e-3,
                      weight_decay=1e-4, early_stopping=None, seed=0, device="cpu", threads=1)
    lrs = [1e-3 * 10 ** (i / (MEMBERS - 1)) for i in range(MEMBERS)]
    members = [Member(key=i, lr=lr, weight_decay=1e-4, dropout=dropout, seed=i, epochs=epochs)
               for i, lr in enumerate(lrs)]
    trains = [train.model_copy(update={"lr": lr, "seed": i}) for i, lr in enumerate(lrs)]
    return model, train, members, trains


def time_sequential(data: TensorData, model: Any, trains: list[Any]) -> float:
    t0 = CLOCK()
    for t in trains:
        fit(build_model(model, data.input_shape, data.n_outputs, t.seed), data, t)
    return CLOCK() - t0


def time_packed(data: TensorData, model: Any, train: Any, members: list[Member]) -> float:
    t0 = CLOCK()
    fit_packed(model, data, members, train)
    return CLOCK() - t0


def step_vmap_vs_bmm(data: TensorData, hidden: list[int], batch: int, reps: int = 30) -> float:
    """Forward + backward of 8 members on one batch each: vmap over functional_call / bmm."""
    from torch.func import functional_call, stack_module_state, vmap

    model = ModelSpec(kind="mlp", hidden=hidden, activation="relu", dropout=0.0)
    nets = [build_model(model, data.input_shape, data.n_outputs, seed=i) for i in range(MEMBERS)]
    params, _ = stack_module_state(nets)
    base = nets[0]
    idx = torch.randint(len(data.x_train), (MEMBERS, batch))
    x, y = data.x_train[idx], data.y_train[idx]  # (N, B, F), (N, B)

    def one(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return functional_call(base, p, (xb,))

    pack = Pack(model, data, size=MEMBERS, batch_size=batch)
    for i in range(MEMBERS):
        pack.add(Member(seed=i))

    def run_vmap() -> None:
        out = vmap(one)(params, x)
        F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()

    def run_bmm() -> None:
        pack.net.backward(pack.net.loss(pack.net.forward(x, None), y))

    times: dict[str, list[float]] = {"vmap": [], "bmm": []}
    for _ in range(3):
        for name, fn in (("vmap", run_vmap), ("bmm", run_bmm)):
            fn()
            t0 = CLOCK()
            for _ in range(reps):
                fn()
            times[name].append(CLOCK() - t0)
    return min(times["vmap"]) / min(times["bmm"])


def measure(data: TensorData, hidden: list[int], batch: int, dropout: float, rounds: int,
            epochs: int) -> dict[str, Any]:
    model, train, members, trains = sides(hidden, batch, dropout, epochs)
    time_packed(data, model, train.model_copy(update={"epochs": 1}),
                [Member(seed=i, epochs=1, dropout=dropout) for i in range(2)])  # warm-up
    time_sequential(data, model, [trains[0].model_copy(update={"epochs": 1})])
    seq, packed, ratios = [], [], []
    for r in range(rounds):
        order = [0, 1] if r % 2 == 0 else [1, 0]
        got = {}
        for side in order:
            got[side] = (time_sequential(data, model, trains) if side == 0
                         else time_packed(data, model, train, members))
        seq.append(got[0])
        packed.append(got[1])
        ratios.append(got[0] / got[1])
    return {"sequential_s": round(statistics.median(seq), 3),
            "packed_s": round(statistics.median(packed), 3),
            "speedup": round(statistics.median(ratios), 2),
            "speedup_min": round(min(ratios), 2), "speedup_max": round(max(ratios), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per member per side")
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    json_stdout()
    torch.set_num_threads(1)
    data = load_data()
    rows, checks = [], []
    for hidden, batch in CONFIGS:
        row: dict[str, Any] = {"hidden": hidden, "batch_size": batch,
                               "pack_pays": pack_pays(ModelSpec(hidden=hidden), batch,
                                                      "cpu")}
        for dropout in (0.0, 0.1):
            say(f"{hidden}/{batch} dropout {dropout}")
            row[f"dropout_{dropout:g}"] = measure(data, hidden, batch, dropout, args.rounds,
                                                  args.epochs)
        row["step_vmap_vs_bmm"] = round(step_vmap_vs_bmm(data, hidden, batch), 2)
        rows.append(row)
        name = f"pack.{'x'.join(map(str, hidden))}_{batch}"
        speedup = row["dropout_0"]["speedup"]
        small = hidden != [128, 64]
        checks.append(check(f"{name}.speedup", speedup, ">=", 2.5 if small else 1.0)
                      if small or row["pack_pays"] else check(f"{name}.speedup", speedup))
        if not small:  # auto must not pack what does not pay
            checks.append(check(f"{name}.auto_packs_only_if_it_pays",
                                float(row["pack_pays"] == (speedup >= 1.0)), ">=", 1.0))
    emit({"bench": "pack", "members": MEMBERS, "epochs_per_member": args.epochs,
          "rounds": args.rounds, "clock": args.clock, "rows_train": len(data.x_train),
          "features": data.input_shape[0], "configs": rows, "checks": checks,
          "machine": machine_info()})


if __name__ == "__main__":
    main()
