"""GPU: one prepared call that checks rungwise's GPU path end to end, and measures it.

Made to run in one call on a machine with NVIDIA GPU(s) (``--device auto`` picks them); on
a CPU-only machine the same script runs the same steps smaller, on the CPU, and reports the
GPU-only steps as skipped, with the reason, so it runs everywhere.

1. Trainer throughput, in this process: ``trainer.loop.fit`` on the device for the adult MLP
   (examples/adult.yaml: [128, 64], batch 512) and the digits CNN (examples/digits.yaml:
   channels [16, 32], batch 64), data already on the device, with the precision rungwise
   picks for the card (``bf16-autocast`` on compute capability 8.0+, else ``fp32``). One
   untimed warm-up epoch, then ``--epochs`` timed ones; samples/s = training rows x epochs /
   the epochs' own time (training pass + validation pass). GPU utilisation:
   ``nvidia-smi --query-gpu=utilization.gpu`` sampled every 0.2 s (mean and max, percent, over
   all cards); ``null`` without nvidia-smi.
2. A tracked sweep with one GPU per trial (``gpus_per_worker: 1``; on the CPU: 0), 4 trials,
   into a fresh SQLite MLflow store, best model registered: the trials' ``rungwise.precision``
   tags, and the registered model loaded through ``mlflow.pyfunc`` in a child process that sees
   no GPU (``CUDA_VISIBLE_DEVICES=""``) predicting raw rows that still have missing values.
3. A DDP trial (``workers_per_trial: 2``, Ray Train): one GPU per rank where the machine has
   two or more, else skipped with the reason on a single-GPU machine; on the CPU, 2 ranks on
   the CPU (gloo).
4. Fractional GPUs (GPU only): 4 trials at ``gpus_per_worker: 0.25`` (4 share one card, each
   capped to a quarter of its memory) against 4 at ``1`` (one after another on one card);
   ``fractional_speedup`` = wall(one per GPU) / wall(0.25 each), and the utilisation of each.
   ``ray.init`` happens before and is not timed.

Usage: python benchmarks/bench_gpu.py [--quick] [--device auto|cpu|cuda] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
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
            if values:  # one line per card: the mean over the cards
                self.samples.append(statistics.fmean(values))

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"gpu_util_mean_pct": None, "gpu_util_max_pct": None}
        return {"gpu_util_mean_pct": r(statistics.fmean(self.samples), 1),
                "gpu_util_max_pct": r(max(self.samples), 1)}


def throughput(spec_path: Path, device: str, epochs: int) -> dict[str, Any]:
    import torch

    from jobs.spec import load_spec
    from trainer.loop import TensorData, fit
    from trainer.models import new_model, precision
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
            "precision": precision(torch.device(device)), "epochs": len(times),
            "epoch_s_median": r(per_epoch, 4), "samples_per_s": r(rows / per_epoch, 0),
            **sampler.summary()}


def _sweep_spec(name: str, overrides: dict[str, Any]) -> Any:
    base = {"train.early_stopping": None, "tune.search": "random",
            "tune.space": {"train.lr": {"loguniform": [1e-4, 3e-3]}},
            "resources.cpus_per_worker": 1, "tracking.register_as": None}
    return common.adult_spec({**base, **overrides}).with_overrides({"name": f"bench-gpu-{name}"})


PREDICT = """
import json, sys
import mlflow, torch
from jobs.spec import load_spec
from jobs.predict import read_rows
uri, name, version, spec_path = sys.argv[1:5]
spec = load_spec(spec_path)
rows = read_rows(spec, str(spec.data.path)).head(2000)
x = rows.drop(columns=[spec.data.target])
mlflow.set_tracking_uri(uri)
pred = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(x)
print(json.dumps({"cuda_visible": torch.cuda.is_available(), "rows": len(x),
                  "rows_with_missing": int(x.isna().any(axis=1).sum()),
                  "predictions": len(pred), "classes": sorted(map(str, set(pred)))}))
"""


def tracked_sweep(gpus: float, epochs: int) -> dict[str, Any]:
    """4 trials, one GPU each (0 on the CPU), tracked and registered; then the model on CPU."""
    from mlflow.tracking import MlflowClient

    with common.bench_env() as tmp, GpuSampler() as sampler:
        uri = common.sqlite_uri(tmp)
        spec = _sweep_spec("sweep", {"train.epochs": epochs, "tune.num_samples": 4,
                                     "tune.max_concurrent": 4, "resources.gpus_per_worker": gpus,
                                     "tracking.uri": uri, "tracking.register_as": "bench-gpu"})
        result, wall, _ = common.timed_sweep(spec, tracking=True, register=True)
        cl = MlflowClient(uri)
        exp = cl.get_run(result.parent_run_id).info.experiment_id
        kids = cl.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
        tags = sorted({k.data.tags.get("rungwise.precision", "missing") for k in kids})
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(common.ROOT)}
        out = subprocess.run([sys.executable, "-c", PREDICT, uri, "bench-gpu", str(result.version),
                              str(common.ADULT)], capture_output=True, text=True, env=env,
                             check=False, timeout=600)
        predicted = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 \
            else {"error": out.stderr.strip().splitlines()[-1:] or [f"rc {out.returncode}"]}
    say(f"sweep, {gpus:g} GPU per trial: 4 trials x {epochs} epochs in {wall:.1f} s; "
        f"precision {tags}; registered v{result.version} predicted on CPU: {predicted}")
    return {"gpus_per_worker": gpus, "trials": len(kids), "epochs": epochs, "wall_s": r(wall),
            "test_accuracy": r(result.test_metrics.get("test_accuracy"), 4),
            "precision_tags": tags, "registered_version": result.version,
            "predict_on_cpu": predicted, **sampler.summary()}


def ddp(gpus_here: int, epochs: int) -> dict[str, Any]:
    """One trial of 2 DDP ranks: one GPU each, or both on the CPU."""
    if gpus_here == 1:
        return {"skipped": "one GPU: a DDP trial of 2 ranks needs 2 (fractions are refused "
                           "for DDP, ray#48012)"}
    gpus = 1 if gpus_here >= 2 else 0
    with common.bench_env() as tmp, GpuSampler() as sampler:
        spec = _sweep_spec("ddp", {"train.epochs": epochs, "tune.num_samples": 1,
                                   "resources.workers_per_trial": 2,
                                   "resources.gpus_per_worker": gpus,
                                   "train.device": "auto" if gpus else "cpu"})
        result, wall, _ = common.timed_sweep(spec, tracking=False, register=False)
        last = next((json.loads(f.read_text().splitlines()[-1])
                     for f in (tmp / "runs").rglob("result.json") if f.read_text().strip()), {})
    say(f"DDP trial, 2 ranks x {gpus} GPU: {epochs} epochs in {wall:.1f} s, "
        f"precision {last.get('precision')}")
    return {"workers": 2, "gpus_per_worker": gpus, "epochs": epochs, "wall_s": r(wall),
            "precision": last.get("precision"), "val_loss": r(result.best_value, 4),
            **sampler.summary()}


def fractional(epochs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": 4, "epochs": epochs}
    for name, gpus, conc in (("fractional_0.25", 0.25, 4), ("one_per_gpu", 1, 1)):
        spec = _sweep_spec(name.replace(".", ""), {
            "train.epochs": epochs, "train.device": "auto", "tune.num_samples": 4,
            "resources.gpus_per_worker": gpus, "tune.max_concurrent": conc})
        with common.bench_env(), GpuSampler() as sampler:
            _, wall, _ = common.timed_sweep(spec, tracking=False, register=False)
        out[name] = {"wall_s": r(wall), **sampler.summary()}
        say(f"sweep {name}: 4 trials x {epochs} epochs in {wall:.1f} s")
    out["fractional_speedup"] = r(out["one_per_gpu"]["wall_s"] / out["fractional_0.25"]["wall_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed epochs, 2-epoch sweeps")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs (default 5)")
    parser.add_argument("--sweep-epochs", type=int, default=None, help="default 5 (quick 2)")
    args = parser.parse_args()
    common.json_stdout()
    common.quiet()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cards = torch.cuda.device_count() if device == "cuda" else 0
    epochs = args.epochs or (3 if args.quick else 5)
    sweep_epochs = args.sweep_epochs or (2 if args.quick else 5)
    out: dict[str, Any] = {"bench": "gpu", "quick": args.quick, "device": device, "gpus": cards,
                           "gpu_name": torch.cuda.get_device_name(0) if cards else None,
                           "capability": list(torch.cuda.get_device_capability(0)) if cards
                           else None}
    say(f"trainer throughput on {device}: adult MLP")
    out["adult_mlp"] = throughput(common.ADULT, device, epochs)
    say(f"trainer throughput on {device}: digits CNN")
    out["digits_cnn"] = throughput(DIGITS, device, epochs)
    from tuning.sweep import init_ray

    init_ray(None)
    out["sweep"] = tracked_sweep(1 if cards else 0, sweep_epochs)
    out["ddp"] = ddp(cards, sweep_epochs)
    out["fractional"] = fractional(sweep_epochs) if cards else {
        "skipped": "no GPU: fractional GPUs per trial need one"}
    out["checks"] = [
        check("gpu.adult_mlp_samples_per_s", out["adult_mlp"]["samples_per_s"]),
        check("gpu.digits_cnn_samples_per_s", out["digits_cnn"]["samples_per_s"]),
        check("gpu.adult_mlp_util_mean_pct", out["adult_mlp"]["gpu_util_mean_pct"]),
        check("gpu.fractional_speedup", out["fractional"].get("fractional_speedup")),
        check("gpu.predict_on_cpu_rows", out["sweep"]["predict_on_cpu"].get("predictions")),
    ]
    common.emit(out)


if __name__ == "__main__":
    main()
