"""The relay: what each Tune trial of a packed sweep runs (see tuning/packed_trial.py).

It holds almost no resources and imports neither torch nor the trainer (a packed sweep starts
N of these per pack, and on a small machine each import is seconds of CPU): it asks the
sweep's ``PackRegistry`` for a pack, joins it (from its own checkpoint after a retry or a
resume), and reports its member's epochs to Tune with the checkpoint files the pack made.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune


def run_packed_trial(config: dict[str, Any], registry: Any) -> None:
    """Join a pack; report this member's epochs to Tune until it finishes or diverges."""
    tid = tune.get_context().get_trial_id()
    resume = _files(tune.get_checkpoint())
    pack = ray.get(registry.assign.remote(tid, config))
    try:
        ray.get(pack.join.remote(tid, config, resume))
        while True:
            out = ray.get(pack.next.remote(tid))
            if out["metrics"] is not None:  # None: resumed after its last epoch (as fit returns)
                _report(out["metrics"], out["files"])
            if out["done"]:
                return
    finally:
        registry.release.remote(tid)


def _report(metrics: dict[str, Any], files: dict[str, bytes] | None) -> None:
    if files is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _files(ckpt: Any) -> dict[str, bytes] | None:
    """The files of the trial's latest checkpoint (read by the pack, which checks them)."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
