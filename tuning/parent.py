"""The sweep's MLflow parent run: what was searched, on what data, and what came out."""

from __future__ import annotations

import csv
import io
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuning.callback import SweepTracker
from tuning.config import SweepSpec
from tuning.lineage import from_raw, log_training_input
from tuning.tracking import client, experiment_id, log_params, mask_secrets, mask_uri


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class ParentRun:
    uri: str
    client: Any
    experiment_id: str
    run_id: str
    spec: SweepSpec | None = None
    dataset_input: Any = None
    """the training data as an MLflow dataset input: logged here and on every child"""

    @classmethod
    def open(cls, uri: str, spec: SweepSpec, strategy: Any, raw: Any, run_id: str | None,
             tags: dict[str, str] | None = None) -> ParentRun:
        """A new parent run, or the same one again when a sweep resumes."""
        cl = client(uri)
        exp = experiment_id(cl, spec.tracking.experiment or spec.name)
        if run_id:
            cl.update_run(run_id, status="RUNNING")
            cl.set_tag(run_id, "rungwise.resumed", "true")
            return cls(uri, cl, exp, run_id, spec, from_raw(spec.data, raw))
        run = cl.create_run(exp, run_name=f"sweep-{spec.name}", tags={
            "rungwise.kind": "sweep", "rungwise.strategy": strategy.name,
            "rungwise.strategy_reason": strategy.reason,
            "rungwise.data_fingerprint": raw.fingerprint, "rungwise.git_commit": git_commit(),
            "rungwise.budget": f"{strategy.num_samples} trials x {spec.train.epochs} epochs",
            **mask_secrets(tags or {})})
        parent = cls(uri, cl, exp, run.info.run_id, spec, from_raw(spec.data, raw))
        log_training_input(cl, parent.run_id, parent.dataset_input)
        log_params(cl, parent.run_id, {**spec.flat(), "tune.search_resolved": strategy.name})
        # the whole spec, tune.space included, masked the same way as the params
        masked = mask_secrets(spec.flat())
        cl.log_text(parent.run_id, yaml.safe_dump(_unflatten(masked), sort_keys=False),
                    "spec.yaml")
        return parent

    def summarise(self, grid: Any, tracker: SweepTracker, best: Any) -> list[dict[str, Any]]:
        """trials.csv, val_curves.png, the best trial's tags and the test metrics."""
        rows = trial_rows(grid, tracker, best.trial_id)
        self.client.log_text(self.run_id, _csv(rows), "trials.csv")
        self._log_png(_curves_png(tracker.curves, best.trial_id), "val_curves.png")
        if self.spec is not None:
            try:  # a sweep that finished is not failed by its explanation
                self.explain(grid, best)
            except Exception as exc:
                self.client.set_tag(self.run_id, "rungwise.explain_error",
                                    f"{type(exc).__name__}: {mask_uri(str(exc))[:500]}")
        best_run = tracker.runs.get(best.trial_id)
        if best_run:
            self.client.set_tag(best_run, "rungwise.best_trial", "true")
        self.client.set_tag(self.run_id, "rungwise.best_trial_id", best.trial_id)
        self.client.set_tag(self.run_id, "rungwise.best_run_id", best_run or "")
        from tuning.tracking import metrics_of

        epochs = sum(int(r.get("epochs") or 0) for r in rows)
        summary = {**best.test_metrics, f"best_{best.metric}": best.value,
                   "trials": len(rows), "epochs_total": epochs}
        self.client.log_batch(self.run_id, metrics=metrics_of(summary, 0))
        log_params(self.client, self.run_id, {f"best.{k}": v for k, v in best.overrides.items()})
        return rows

    def explain(self, grid: Any, best: Any) -> None:
        """Importances, parallel coordinates and best_spec.yaml (tuning/explain.py)."""
        from tuning import explain
        from tuning.tracking import metrics_of

        spec = self.spec
        assert spec is not None, "explain needs the sweep's spec"
        self.client.log_text(self.run_id, explain.best_spec_yaml(spec, best.overrides),
                             "best_spec.yaml")
        trials = explain.scored_trials(grid, spec.tune.metric, spec.tune.mode)
        space = dict(spec.tune.space)
        values = explain.importances(space, trials, spec.tune.mode)
        if values:
            self.client.log_batch(self.run_id, metrics=metrics_of(
                {f"importance.{k}": v for k, v in values.items()}, 0))
            self._log_png(explain.importance_png(values, spec.tune.metric),
                          "param_importances.png")
        self._log_png(explain.parallel_png(space, trials, spec.tune.metric),
                      "parallel_coordinates.png")

    def _log_png(self, png: bytes | None, name: str) -> None:
        if png is None:
            return
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / name
            path.write_bytes(png)
            self.client.log_artifact(self.run_id, str(path))

    def end(self, exc: BaseException | None) -> None:
        if exc is None:
            self.client.set_terminated(self.run_id, "FINISHED")
            return
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        self.client.set_tag(self.run_id, "rungwise.error",
                            f"{type(exc).__name__}: {mask_uri(str(exc))[:500]}")
        self.client.set_terminated(self.run_id, status)


def trial_rows(grid: Any, tracker: SweepTracker, best_id: str) -> list[dict[str, Any]]:
    from tuning.space import decode_config

    rows = []
    for result in grid:
        tid = result.metrics.get("trial_id") if result.metrics else None
        tid = tid or (result.path.rsplit("_", 2)[0] if result.path else "?")
        curve = tracker.curves.get(tid, [])
        outcome = tracker.outcomes.get(tid, {})
        rows.append({
            "trial_id": tid, "run_id": tracker.runs.get(tid, ""),
            "status": outcome.get("status", "error" if result.error else "unknown"),
            "epochs": max((s for s, _ in curve), default=0),
            "best_val_loss": min((v for _, v in curve), default=float("nan")),
            "best": tid == best_id,
            **{k: str(v) for k, v in mask_secrets(decode_config(result.config or {})).items()},
        })
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _curves_png(curves: dict[str, list[tuple[int, float]]], best_id: str) -> bytes | None:
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for tid, points in curves.items():
        if not points:
            continue
        steps, values = zip(*sorted(points), strict=True)
        best = tid == best_id
        ax.plot(steps, values, lw=2.5 if best else 1, alpha=1 if best else 0.6,
                label=f"{tid} (best)" if best else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val_loss")
    ax.set_yscale("log")
    ax.set_title("Validation loss of every trial (stopped trials end early)")
    ax.legend(loc="upper right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out

