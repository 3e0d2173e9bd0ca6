"""The trainer's epoch vs a minimal hand-written loop vs a default DataLoader, same process.

Data: the adult demo (examples/adult.yaml) prepared by ``trainer.pipeline`` (~100 float32
columns, ~22,800 training rows). Model: MLP [256, 128] relu (dropout as in the spec), AdamW,
batch 512, one torch thread, CPU. All three sides do the same work per epoch: a shuffled pass
over the training rows (forward, backward, step) and one pass over the validation split
(loss + accuracy). They differ only in how batches are made and in the trainer's own
bookkeeping (callback, per-epoch checkpoint dict, best-weights copy):

- trainer:     ``trainer.loop.fit`` with an ``on_epoch`` callback (checkpoint every epoch);
- handwritten: ``randperm`` + index slices of the same tensors, nothing else;
- dataloader:  ``DataLoader(TensorDataset(x, y), batch_size=512, shuffle=True)``.

Runs are interleaved (rounds of a few epochs each, order rotated) and the median epoch time
is reported. The clock is the process's CPU time by default (``--clock process``): all three
sides run in this one process on one torch thread (the DataLoader with ``num_workers=0``), so
CPU time measures their work and is not inflated when other jobs share the cores;
``--clock wall`` measures elapsed time instead. ``fetch_*`` time the batching alone (no
model): one epoch of index slices vs one epoch of the DataLoader.

``trainer_vs_handwritten`` = trainer / handwritten (target <= 1.10); ``dataloader_vs_trainer``
= dataloader / trainer. The DataLoader's extra cost is its row-by-row fetch and collate
(``fetch_dataloader_vs_slices``, 10-20x here); how much of an epoch that is depends on how
much compute the model does per row: with [256, 128] the matmuls dominate the epoch.

Usage: python benchmarks/bench_trainer.py [--rounds 5] [--epochs 3] [--clock process|wall]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from jobs.spec import JobSpec, load_spec
from trainer.loop import TensorData, fit
from trainer.models import build_model
from trainer.pipeline import prepare, split_data

ROOT = Path(__file__).resolve().parents[1]
CLOCK: Callable[[], float] = time.process_time
OVERRIDES = {"model.hidden": [256, 128], "model.activation": "relu", "train.batch_size": 512,
             "train.optimizer": "adamw", "train.threads": 1, "train.device": "cpu",
             "train.early_stopping": None, "train.lr_schedule": "none"}


def load_data() -> tuple[TensorData, JobSpec]:
    spec = load_spec(ROOT / "examples" / "adult.yaml", overrides=OVERRIDES)
    return TensorData.from_prepared(prepare(split_data(spec.data), spec.impute)), spec


def val_pass(model: torch.nn.Module, data: TensorData) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(data.x_val)
        loss = F.cross_entropy(out, data.y_val).item()
        acc = (out.argmax(-1) == data.y_val).float().mean().item()
    return loss, acc


def manual_epochs(batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                  data: TensorData, spec: JobSpec, epochs: int) -> list[float]:
    """A minimal loop: the same model and optimiser as the trainer builds."""
    model = build_model(spec.model, data.input_shape, data.n_outputs, spec.train.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.train.lr,
                            weight_decay=spec.train.weight_decay)
    times = []
    for _ in range(epochs):
        t0 = CLOCK()
        model.train()
        for xb, yb in batches():
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val_pass(model, data)
        times.append(CLOCK() - t0)
    return times


def handwritten(data: TensorData, spec: JobSpec, epochs: int) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    x, y, bs = data.x_train, data.y_train, spec.train.batch_size

    def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            yield x[idx], y[idx]

    return manual_epochs(batches, data, spec, epochs)


def dataloader(data: TensorData, spec: JobSpec, epochs: int) -> list[float]:
    loader = DataLoader(TensorDataset(data.x_train, data.y_train),
                        batch_size=spec.train.batch_size, shuffle=True)
    return manual_epochs(lambda: loader, data, spec, epochs)


def trainer(data: TensorData, spec: JobSpec, epochs: int) -> list[float]:
    """Wall time between epoch callbacks (the first from the call of ``fit``)."""
    model = build_model(spec.model, data.input_shape, data.n_outputs, spec.train.seed)
    stamps = [CLOCK()]
    train = spec.train.model_copy(update={"epochs": epochs})
    fit(model, data, train, on_epoch=lambda m, c: stamps.append(CLOCK()))
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def fetch_only(data: TensorData, batch_size: int) -> tuple[float, float]:
    """One epoch of batches and nothing else: index slices vs the default DataLoader."""
    x, y = data.x_train, data.y_train
    t0 = CLOCK()
    perm = torch.randperm(len(x))
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        x[idx], y[idx]
    t1 = CLOCK()
    for _ in DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True):
        pass
    return t1 - t0, CLOCK() - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per side per round")
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(1)
    data, spec = load_data()
    sides = {"trainer": trainer, "handwritten": handwritten, "dataloader": dataloader}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():  # warm-up: imports, allocator, first-call overheads
        fn(data, spec, 1)
    for r in range(args.rounds):
        names = list(sides)[r % 3:] + list(sides)[:r % 3]
        for name in names:
            times[name] += sides[name](data, spec, args.epochs)
    med = {name: statistics.median(t) for name, t in times.items()}
    fetch = [fetch_only(data, spec.train.batch_size) for _ in range(3)]
    fetch_slices, fetch_loader = (statistics.median(f) for f in zip(*fetch, strict=True))
    print(json.dumps({
        "bench": "trainer", "trainer_epoch_s": round(med["trainer"], 4),
        "handwritten_epoch_s": round(med["handwritten"], 4),
        "dataloader_epoch_s": round(med["dataloader"], 4),
        "trainer_vs_handwritten": round(med["trainer"] / med["handwritten"], 3),
        "dataloader_vs_trainer": round(med["dataloader"] / med["trainer"], 2),
        "fetch_slices_s": round(fetch_slices, 4), "fetch_dataloader_s": round(fetch_loader, 4),
        "fetch_dataloader_vs_slices": round(fetch_loader / fetch_slices, 1),
        "rows_train": len(data.x_train), "features": data.input_shape[0],
        "epochs_per_side": len(times["trainer"]), "clock": args.clock,
    }))


if __name__ == "__main__":
    main()
