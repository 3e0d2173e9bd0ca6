"""GPU: trainer samples/s and utilisation, and fractional GPUs per trial vs one per GPU.

Made to run in one prepared call on a machine with an NVIDIA GPU (``--device auto`` picks
it); on a CPU-only machine the same script measures the trainer on the CPU and reports the
sweep part as skipped, with the reason, so it runs everywhere.

1. Trainer throughput, in this process: ``trainer.loop.fit`` on the device for the adult MLP
   (examples/adult.yaml: [128, 64], batch 512) and the digits CNN (examples/digits.yaml:
   channels [16, 32], batch 64), data already on the device, bf16 autocast on CUDA (as
   rungwise trains). One untimed warm-up epoch, then ``--epochs`` timed ones; samples/s =
   training rows x epochs / the epochs' own time (training pass + validation pass).
   GPU utilisation: ``nvidia-smi --query-gpu=utilization.gpu`` sampled every 0.2 s during
   the timed epochs (mean and max, percent); ``null`` without nvidia-smi.
2. Fractional GPUs (GPU only): the adult MLP sweep of 4 trials x ``--sweep-epochs`` epochs,
   tracking off, once with ``resources.gpus_per_worker: 0.25`` (4 trials share the GPU, 4 at
   a time) and once with ``1`` (one trial per GPU: on one GPU they run one after another).
   ``fractional_speedup`` = wall(one per GPU) / wall(0.25 each); ``ray.init`` happens before
   both and is not timed.

Usage: python benchmarks/bench_gpu.py [--quick] [--device auto|cpu|cuda] [--epochs 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import check, r, say  # noqa: E402

DIGITS = common.ROOT / "examples" / "digits.yaml"


class GpuSampler:
    """``nvidia-smi`` utilisation (percent) every ``every`` seconds, in a thread."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.samples = every, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._exe = shutil.which("nvidia-smi")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        if self._exe:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._exe:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            out = subprocess.run([str(self._exe), "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=False).stdout
            values = [float(v) for v in out.split() if v.strip().replace(".", "").isdigit()]
            if values:
                self.samples.append(values[0])

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"gpu_util_mean_pct": None, "gpu_util_max_pct": None}
        return {"gpu_util_mean_pct": r(statistics.fmean(self.samples), 1),
                "gpu_util_max_pct": r(max(self.samples), 1)}


def throughput(spec_path: Path, device: str, epochs: int) -> dict[str, Any]:
    import torch

    from jobs.spec import load_spec
    from trainer.loop import TensorData, fit
    from trainer.models import new_model
    from trainer.pipeline import prepare, split_data

    spec = load_spec(spec_path, overrides={"train.device": device, "train.early_stopping": None,
                                           "train.lr_schedule": "none"})
    data = TensorData.from_prepared(prepare(split_data(spec.data), spec.impute))
    rows = len(data.x_train)
    net = new_model(spec.model, data, seed=0)
    fit(net, data, spec.train.model_copy(update={"epochs": 1}))  # warm-up: kernels, allocator
    times: list[float] = []
    with GpuSampler() as sampler:
        fit(net, data, spec.train.model_copy(update={"epochs": epochs}),
            on_epoch=lambda m, _c: times.append(float(m["epoch_time_s"])))
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    per_epoch = statistics.median(times)
    return {"model": spec.model.kind, "batch_size": spec.train.batch_size, "rows_train": rows,
            "epochs": len(times), "epoch_s_median": r(per_epoch, 4),
            "samples_per_s": r(rows / per_epoch, 0), **sampler.summary()}


def fractional(epochs: int) -> dict[str, Any]:
    from tuning.sweep import init_ray

    init_ray(None)
    walls: dict[str, float] = {}
    base = {"train.epochs": epochs, "train.early_stopping": None, "train.device": "auto",
            "tune.search": "random", "tune.num_samples": 4,
            "tune.space": {"train.lr": {"loguniform": [1e-4, 3e-3]}},
            "tracking.register_as": None, "resources.cpus_per_worker": 1}
    for name, gpus, conc in (("fractional_0.25", 0.25, 4), ("one_per_gpu", 1, 1)):
        spec = common.adult_spec({**base, "resources.gpus_per_worker": gpus,
                                  "tune.max_concurrent": conc}).with_overrides(
            {"name": f"bench-gpu-{name}"})
        with common.bench_env():
            _, wall, _ = common.timed_sweep(spec, tracking=False, register=False)
        walls[name] = wall
        say(f"sweep {name}: 4 trials x {epochs} epochs in {wall:.1f} s")
    return {"trials": 4, "epochs": epochs,
            "wall_fractional_s": r(walls["fractional_0.25"]),
            "wall_one_per_gpu_s": r(walls["one_per_gpu"]),
            "fractional_speedup": r(walls["one_per_gpu"] / walls["fractional_0.25"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed epochs, 3-epoch sweeps")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs (default 5)")
    parser.add_argument("--sweep-epochs", type=int, default=None, help="default 10 (quick 3)")
    args = parser.parse_args()
    common.json_stdout()
    common.quiet()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    epochs = args.epochs or (3 if args.quick else 5)
    out: dict[str, Any] = {"bench": "gpu", "quick": args.quick, "device": device,
                           "gpu_name": torch.cuda.get_device_name(0) if device == "cuda"
                           else None}
    say(f"trainer throughput on {device}: adult MLP")
    out["adult_mlp"] = throughput(common.ADULT, device, epochs)
    say(f"trainer throughput on {device}: digits CNN")
    out["digits_cnn"] = throughput(DIGITS, device, epochs)
    if device == "cuda":
        out["sweep"] = fractional(args.sweep_epochs or (3 if args.quick else 10))
    else:
        out["sweep"] = {"skipped": "no GPU: fractional GPUs per trial need one"}
    out["checks"] = [
        check("gpu.adult_mlp_samples_per_s", out["adult_mlp"]["samples_per_s"]),
        check("gpu.digits_cnn_samples_per_s", out["digits_cnn"]["samples_per_s"]),
        check("gpu.adult_mlp_util_mean_pct", out["adult_mlp"]["gpu_util_mean_pct"]),
        check("gpu.fractional_speedup", out["sweep"].get("fractional_speedup")),
    ]
    common.emit(out)


if __name__ == "__main__":
    main()
