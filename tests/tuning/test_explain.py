"""A sweep explains itself on its MLflow parent run (#12): importances (metrics + PNG), a
parallel-coordinates PNG, a best_spec.yaml that `rungwise train` runs as it is, and on every
trial ASHA stopped a one-sentence ``rungwise.stop_reason`` with the rung, the cutoff and how
many trials were there. One real ASHA sweep on a real local Ray and SQLite store, which also
shows ASHA stopping the trials that cannot learn (lr 1e-5) early."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from jobs.spec import load_spec
from tests.conftest import EXAMPLES, sqlite_store
from tests.registered import rungwise
from tuning.sweep import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SAMPLES, EPOCHS = 8, 6

REASON = re.compile(r"Stopped at rung (\d+) \(epoch (\d+)\): val_loss (\S+) was above the "
                    r"cutoff (\S+) set by the (\d+) trials? already at that rung\.")


@pytest.fixture(scope="module")
def sweep(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("explain")
    uri = sqlite_store(folder)
    mp = pytest.MonkeyPatch()
    mp.setenv("RUNGWISE_STORAGE", str(folder / "runs"))
    space = {"train.lr": {"choice": [1e-5, 3e-3]}, "model.dropout": {"uniform": [0.0, 0.3]}}
    spec = load_spec(EXAMPLES / "adult.yaml").with_overrides({
        "tune.search": "asha", "tune.space": space, "tune.num_samples": SAMPLES,
        "tune.max_concurrent": 2, "train.epochs": EPOCHS, "tune.grace_period": 1,
        "tune.reduction_factor": 2, "train.early_stopping": None, "model.hidden": [16],
        "tracking.uri": uri})
    try:
        result = run_sweep(spec, quiet=True, register=False)
    finally:
        mp.undo()
    return {"folder": folder, "uri": uri, "result": result}


def _stopped_by_asha(sweep: dict[str, object]) -> tuple[Any, list[Any], list[Any]]:
    """The sweep's result, its trial runs, and those ASHA stopped (there must be some)."""
    uri, result = sweep["uri"], sweep["result"]
    cl = MlflowClient(uri)
    exp = cl.get_run(result.parent_run_id).info.experiment_id
    kids = cl.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    stopped = [k for k in kids if k.data.tags["rungwise.status"] == "stopped_by_scheduler"]
    assert stopped, [k.data.tags["rungwise.status"] for k in kids]
    return result, kids, stopped


def test_every_stopped_trial_says_why(sweep: dict[str, object]) -> None:
    result, kids, stopped = _stopped_by_asha(sweep)
    for kid in stopped:
        reason = kid.data.tags["rungwise.stop_reason"]
        m = REASON.fullmatch(reason)
        assert m, reason
        rung, epoch, value, cutoff, others = m.groups()
        assert int(epoch) == int(kid.data.tags["rungwise.stopped_at_epoch"])
        assert int(epoch) == 2 ** (int(rung) - 1)  # grace 1, reduction factor 2
        assert float(value) > float(cutoff) and int(others) >= 1
    assert all("rungwise.stop_reason" not in k.data.tags for k in kids if k not in stopped)


def test_importances_and_plots_on_the_parent(sweep: dict[str, object]) -> None:
    uri, result = sweep["uri"], sweep["result"]
    cl = MlflowClient(uri)
    parent = cl.get_run(result.parent_run_id)
    imp = {k: v for k, v in parent.data.metrics.items() if k.startswith("importance.")}
    assert set(imp) == {"importance.train.lr", "importance.model.dropout"}, imp
    assert abs(sum(imp.values()) - 1.0) < 1e-6
    assert imp["importance.train.lr"] > imp["importance.model.dropout"]  # 1e-5 cannot learn
    for name in ("param_importances.png", "parallel_coordinates.png"):
        path = mlflow.artifacts.download_artifacts(run_id=result.parent_run_id,
                                                   artifact_path=name, tracking_uri=uri)
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_spec_trains_as_it_is(sweep: dict[str, object]) -> None:
    uri, result, folder = sweep["uri"], sweep["result"], sweep["folder"]
    path = Path(mlflow.artifacts.download_artifacts(
        run_id=result.parent_run_id, artifact_path="best_spec.yaml", tracking_uri=uri))
    best = yaml.safe_load(path.read_text())
    assert best["train"]["lr"] == result.best_overrides["train.lr"]
    assert best["model"]["dropout"] == result.best_overrides["model.dropout"]
    assert best["tune"]["space"]["train.lr"] == {"choice": [1e-5, 3e-3]}
    run_dir = folder / "again"
    run_dir.mkdir()
    proc = rungwise(["train", str(path)], run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cl = MlflowClient(uri)
    exp = cl.get_run(result.parent_run_id).info.experiment_id
    (train,) = cl.search_runs([exp], "tags.`rungwise.kind` = 'train'")
    assert float(train.data.params["train.lr"]) == result.best_overrides["train.lr"]


def test_parent_and_every_child_record_the_training_data(sweep: dict[str, object]) -> None:
    uri, result = sweep["uri"], sweep["result"]
    cl = MlflowClient(uri)
    parent = cl.get_run(result.parent_run_id)
    exp = parent.info.experiment_id
    kids = cl.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    digest = parent.data.tags["rungwise.data_fingerprint"]
    for run in [parent, *kids]:
        (entry,) = run.inputs.dataset_inputs
        assert entry.dataset.digest == digest
        assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "training")]
        assert entry.dataset.source.endswith('adult-train.csv.gz"}'), entry.dataset.source


def test_asha_stops_bad_trials_early(sweep: dict[str, object]) -> None:
    result, kids, stopped = _stopped_by_asha(sweep)
    for kid in stopped:
        assert int(kid.data.tags["rungwise.stopped_at_epoch"]) < EPOCHS
        assert kid.data.tags["rungwise.stopped_metric"].startswith("val_loss=")
        assert kid.info.status == "FINISHED"
    assert result.best_overrides["train.lr"] == 3e-3
    assert sum(r["epochs"] for r in result.trials) < SAMPLES * EPOCHS
