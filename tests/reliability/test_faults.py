"""Faults injected for real into real sweeps (local Ray, SQLite MLflow), and what survives them.

* a trial crashes once: Tune retries it from its last checkpoint, its MLflow run has each
  epoch once, and the sweep has exactly one child run per trial;
* a trial crashes on every attempt: its run is FAILED with the error, the searcher (Optuna) is
  told the trial FAILED, and the best model comes from the others;
* a trial diverges: FAILED, tagged ``diverged``, never the best, and the searcher got the worst
  value (1e9) instead of a NaN;
* a trial runs out of memory: FAILED with a message naming ``model.hidden``; the others go on;
  ``rungwise train`` exits 2 with one line;
* a retrain whose challenger cannot be evaluated promotes nothing.

Crashes come from a test-only wrapper around the product's trainable (tests/reliability/
faults.py): the driver pickles it into the trials, so it reaches the workers of the session's
already running Ray; the product carries no fault hook.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

import tuning.sweep
from tests.conftest import ROOT
from tests.jobs.test_retrain import NAME as RETRAIN_NAME
from tests.jobs.test_retrain import alias as retrain_alias
from tests.jobs.test_retrain import data  # noqa: F401 - the fixture, reused
from tests.jobs.test_retrain import write_spec as write_retrain_spec
from tests.reliability.faults import crashing
from tests.tuning.test_sweep import children, small_spec
from tuning.sweep import run_sweep

LR_SPACE = {"train.lr": {"loguniform": [1e-3, 1e-2]}}


def _faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> Path:
    """Every trial of the next sweep runs through the crashing wrapper (``fault``: see there)."""
    folder = tmp_path / "faults"
    monkeypatch.setattr(tuning.sweep, "run_trial", crashing(fault, folder))
    return folder


def crashed_trials(folder: Path) -> dict[str, int]:
    """trial id -> number of injected crashes (one line per attempt that crashed)."""
    prefix = "rungwise-fault-crashed-"
    return {p.name[len(prefix):]: len(p.read_text().splitlines())
            for p in folder.glob(prefix + "*")}


def tune_rows(experiment_path: str, trial_id: str) -> list[dict[str, Any]]:
    """Every result Tune recorded for a trial (its result.json), attempts included."""
    files = [p for p in Path(experiment_path).glob("*/result.json")
             if trial_id in p.parent.name]
    assert len(files) == 1, (trial_id, files)
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def capture_strategy(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Keep the Strategy that run_sweep builds (unchanged), to look at its live searcher."""
    seen: dict[str, Any] = {}
    real = tuning.sweep.build_strategy

    def build(*args: Any, **kwargs: Any) -> Any:
        seen["strategy"] = real(*args, **kwargs)
        return seen["strategy"]

    monkeypatch.setattr(tuning.sweep, "build_strategy", build)
    return seen


def optuna_states(strategy: Any) -> dict[str, Any]:
    """Tune trial id -> the Optuna trial the searcher recorded for it (state, value)."""
    searcher = strategy.search_alg.searcher  # ConcurrencyLimiter -> OptunaSearch
    study = searcher._ot_study
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return {tid: by_number[ot.number] for tid, ot in searcher._ot_trials.items()}


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_that_crashes_once_resumes_from_its_checkpoint(
        ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        mlflow_uri: str) -> None:
    folder = _faults(tmp_path, monkeypatch, "crash:0.2:2")
    spec = small_spec(tmp_path, monkeypatch, mlflow_uri, **{
        "tune.num_samples": 10, "tune.max_failures": 2, "train.epochs": 3,
        "tune.space": LR_SPACE})
    result = run_sweep(spec, quiet=True, register=False)

    crashed = crashed_trials(folder)
    assert len(crashed) == 2 and set(crashed.values()) == {1}, crashed  # 2 of 10, once each
    kids = children(mlflow_uri, result.parent_run_id)
    ids = [k.data.tags["rungwise.trial_id"] for k in kids]
    assert len(ids) == 10 and len(set(ids)) == 10, ids  # one child per trial, no more
    assert set(crashed) <= set(ids)
    cl = MlflowClient(mlflow_uri)
    for kid in kids:
        assert kid.info.status == "FINISHED", kid.data.tags
        assert kid.data.tags["rungwise.status"] == "finished"
        steps = [m.step for m in cl.get_metric_history(kid.info.run_id, "val_loss")]
        assert sorted(steps) == [1, 2, 3], (kid.data.tags["rungwise.trial_id"], steps)
    for tid in ids:
        rows = tune_rows(result.experiment_path, tid)
        epochs = [r["epoch"] for r in rows]
        assert epochs == [1, 2, 3], (tid, epochs)  # no epoch reported twice
        last = rows[-1]
        if tid in crashed:  # restored: Tune restarted it from the epoch-1 checkpoint
            assert last["iterations_since_restore"] == 2 and last["training_iteration"] == 3
        else:
            assert last["iterations_since_restore"] == 3
    assert math.isfinite(result.best_value)
    assert {r["status"] for r in result.trials} == {"finished"}


@pytest.mark.ray
@pytest.mark.slow
def test_trials_that_keep_crashing_fail_and_the_searcher_is_told(
        ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        mlflow_uri: str) -> None:
    folder = _faults(tmp_path, monkeypatch, "crash:0.3:2:always")
    seen = capture_strategy(monkeypatch)
    spec = small_spec(tmp_path, monkeypatch, mlflow_uri, **{
        "tune.search": "bayes", "tune.num_samples": 7, "tune.max_failures": 1,
        "train.epochs": 3, "tune.space": LR_SPACE})
    result = run_sweep(spec, quiet=True, register=False)

    crashed = crashed_trials(folder)
    assert len(crashed) == 2 and set(crashed.values()) == {2}, crashed  # 1 try + 1 retry
    kids = {k.data.tags["rungwise.trial_id"]: k for k in
            children(mlflow_uri, result.parent_run_id)}
    assert len(kids) == 7
    failed = {tid for tid, k in kids.items() if k.info.status == "FAILED"}
    assert failed == set(crashed)
    for tid in failed:
        tags = kids[tid].data.tags
        assert tags["rungwise.status"] == "failed"
        assert "injected fault at epoch 2" in tags["rungwise.error"], tags
        assert tags.get("rungwise.best_trial") != "true"
    for tid in set(kids) - failed:
        assert kids[tid].info.status == "FINISHED"
    parent = MlflowClient(mlflow_uri).get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["rungwise.best_trial_id"] not in failed
    assert math.isfinite(result.best_value)
    # Tune told the searcher: Optuna's study holds the failures as FAIL, not as a value
    from optuna.trial import TrialState

    states = optuna_states(seen["strategy"])
    assert set(states) == set(kids)
    for tid, ot in states.items():
        if tid in failed:
            assert ot.state == TrialState.FAIL and ot.value is None, (tid, ot)
        else:
            assert ot.state == TrialState.COMPLETE and math.isfinite(ot.value), (tid, ot)


@pytest.mark.ray
@pytest.mark.slow
def test_a_diverged_trial_fails_and_the_searcher_gets_the_worst_value(
        ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        mlflow_uri: str) -> None:
    # lr 10 (the spec's maximum) with SGD momentum 0.99 on batches of 32: NaN in epoch 1
    seen = capture_strategy(monkeypatch)
    spec = small_spec(tmp_path, monkeypatch, mlflow_uri, **{
        "tune.search": "bayes", "tune.num_samples": 2, "train.epochs": 2,
        "train.optimizer": "sgd", "train.momentum": 0.99, "train.weight_decay": 0.0,
        "train.batch_size": 32, "tune.space": {"train.lr": {"choice": [10.0, 3e-3]}}})
    # both values first (the searcher's points_to_evaluate), so the test does not depend on TPE
    result = run_sweep(spec, quiet=True, register=False,
                       warm_start=[{"train.lr": 10.0}, {"train.lr": 3e-3}])

    kids = children(mlflow_uri, result.parent_run_id)
    by_lr = {float(k.data.params["train.lr"]): k for k in kids}
    assert set(by_lr) == {10.0, 3e-3}
    bad, good = by_lr[10.0], by_lr[3e-3]
    assert bad.info.status == "FAILED"
    assert bad.data.tags["rungwise.status"] == "diverged"
    assert "train.lr" in bad.data.tags["rungwise.error"], bad.data.tags
    assert "nan" in bad.data.tags["rungwise.error"] or "inf" in bad.data.tags["rungwise.error"]
    assert bad.data.tags.get("rungwise.best_trial") != "true"
    assert good.info.status == "FINISHED" and good.data.tags["rungwise.best_trial"] == "true"
    assert result.best_overrides == {"train.lr": 3e-3}
    bad_id = bad.data.tags["rungwise.trial_id"]
    last = tune_rows(result.experiment_path, bad_id)[-1]
    assert last["diverged"] == 1 and last["val_loss"] == 1e9  # what Tune's searcher saw
    ot = optuna_states(seen["strategy"])[bad_id]
    from optuna.trial import TrialState

    assert ot.state == TrialState.COMPLETE and ot.value == 1e9  # the worst value, not NaN


HUGE = [200000, 200000]  # 200k x 200k float32 weights = 149 GiB: no CPU here can allocate it


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_space_whose_choice_cannot_fit_is_refused_before_any_trial(
        ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        mlflow_uri: str) -> None:
    """The memory a trial needs is estimated before the sweep starts (trainer/memory.py): a
    choice that no node can hold refuses the sweep, naming the choice, before MLflow or Tune
    see anything (it used to fail as one trial among the others, after it had started)."""
    from trainer.models import OutOfMemory

    spec = small_spec(tmp_path, monkeypatch, mlflow_uri, **{
        "tune.search": "grid", "train.epochs": 2,
        "tune.space": {"model.hidden": {"choice": [[16], HUGE, [32]]}}})
    with pytest.raises(OutOfMemory) as info:
        run_sweep(spec, quiet=True, register=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"tune.space.model.hidden: the choice {HUGE} needs about 601.0 GiB"), msg
    assert "(weights 149.1 GiB, gradients and adamw state 447.3 GiB" in msg, msg
    assert "; the largest node of the Ray cluster has " in msg and msg.endswith(": lower it")
    cl = MlflowClient(mlflow_uri)
    assert cl.search_runs([e.experiment_id for e in cl.search_experiments()]) == []
    assert not list((tmp_path / "runs").rglob("*.json"))  # no sweep state written


@pytest.mark.slow
def test_train_out_of_memory_exits_2_with_one_line(tmp_path: Path) -> None:
    """`rungwise train` estimates the run's memory before it builds the model."""
    store = tmp_path / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RUNGWISE_DEBUG", None)
    out = subprocess.run(
        [sys.executable, "-m", "jobs", "train", str(ROOT / "examples/adult.yaml"),
         "--set", f"tracking.uri=sqlite:///{store}", "--set", f"model.hidden={HUGE}",
         "--set", "train.epochs=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr[-2000:]
    assert err[0].startswith(
        "rungwise: error: model.hidden=[200000, 200000] needs about 601.0 GiB"), err[0]
    assert "(weights 149.1 GiB" in err[0] and "; this machine has " in err[0], err[0]
    assert out.returncode == 2, out.stderr[-2000:]
    assert not store.exists()  # refused before MLflow is touched


@pytest.mark.slow
def test_a_challenger_that_fails_evaluation_is_never_promoted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str,
        data: dict[str, Path]) -> None:  # noqa: F811
    """The challenger trains and registers, then cannot score the holdout (injected: its
    bundle raises like a model that meets a column it never saw): the champion stays."""
    from jobs.retrain import retrain
    from jobs.spec import load_spec
    from tuning import registry

    monkeypatch.setenv("RUNGWISE_STORAGE", str(tmp_path / "storage"))
    path = write_retrain_spec(tmp_path, data["good"], mlflow_uri, retrain="refit")
    first = retrain(load_spec(path), quiet=True)
    assert first.champion_after == "1"

    real = registry.load_bundle

    def broken_challenger(uri: str, name: str, alias: str) -> Any:
        bundle = real(uri, name, alias)
        if alias == "challenger":
            def evaluate(*args: Any, **kwargs: Any) -> Any:
                raise ValueError("injected: column 'age' was never seen")

            bundle.evaluate = evaluate
        return bundle

    monkeypatch.setattr(registry, "load_bundle", broken_challenger)
    second = retrain(load_spec(path), quiet=True)
    d = second.decision
    assert not d.promote and "challenger failed evaluation" in d.reason, d
    assert retrain_alias(mlflow_uri, "champion") == "1" == second.champion_after
    assert retrain_alias(mlflow_uri, "challenger") == "2"
    tags = MlflowClient(mlflow_uri).get_run(second.run_id).data.tags
    assert tags["rungwise.decision"] == "kept"
    assert RETRAIN_NAME == "retrain-test"
