"""`rungwise retrain`: the champion/challenger gate against a real SQLite MLflow registry.

Data: 6,000 adult rows (``good.csv``) and a ``noisy.csv`` copy whose feature values are
shuffled, column by column, among the training and validation rows only. The target and the
test rows are untouched, so both files have the same test split (asserted): a model trained on
``noisy.csv`` learns little more than the class prior, and both models are scored on the same
real holdout. Refit tests need no Ray; sweep tests share the session's Ray (`ray_session`).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from jobs.challenger import parse_param
from jobs.cli import UserError
from jobs.retrain import (
    Gate,
    decide,
    gate_for,
    lock_path,
    retrain,
    retrain_lock,
)
from jobs.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
ADULT = ROOT / "data" / "adult" / "adult-train.csv.gz"
COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
           "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
           "hours_per_week", "native_country", "income"]
ROWS = 6000
NAME = "retrain-test"


def write_spec(folder: Path, data: Path, uri: str, retrain: str = "refit",
               **schedule: Any) -> Path:
    spec = {
        "name": NAME,
        "data": {"path": str(data), "columns": COLUMNS, "target": "income",
                 "task": "classification", "na_values": ["?"],
                 "split": {"val": 0.15, "test": 0.15, "seed": 0, "stratify": True}},
        "impute": {"numeric": "median", "categorical": "category", "indicator": True},
        "model": {"kind": "mlp", "hidden": [16]},
        "train": {"epochs": 3, "batch_size": 256, "lr": 3e-3, "seed": 0},
        "tune": {"search": "random", "num_samples": 2, "max_concurrent": 2,
                 "space": {"train.lr": {"choice": [3e-3, 1e-2]}}},
        "resources": {"gpus_per_worker": 0},
        "tracking": {"uri": uri, "register_as": NAME},
        "schedule": {"retrain": retrain, "promote_if_better_by": 0.002, **schedule},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trainer.pipeline import split_data

    folder = tmp_path_factory.mktemp("retrain-data")
    frame = pd.read_csv(ADULT, header=None, nrows=ROWS)
    good = folder / "good.csv"
    frame.to_csv(good, header=False, index=False)
    spec_path = write_spec(folder, good, "sqlite:///unused.db")
    good_test = split_data(load_spec(spec_path).data).test
    test_rows = good_test.index
    noisy_frame = frame.copy()
    rest = np.setdiff1d(np.arange(len(frame)), test_rows.to_numpy())
    rng = np.random.default_rng(0)
    for col in frame.columns[:-1]:  # every feature; the target (last) stays
        noisy_frame.iloc[rest, col] = frame.iloc[rng.permutation(rest), col].to_numpy()
    noisy = folder / "noisy.csv"
    noisy_frame.to_csv(noisy, header=False, index=False)
    noisy_test = split_data(load_spec(spec_path, {"data.path": str(noisy)}).data).test
    pd.testing.assert_frame_equal(noisy_test, good_test)  # the same holdout in both files
    return {"good": good, "noisy": noisy}


@pytest.fixture(autouse=True)
def _storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNGWISE_STORAGE", str(tmp_path / "storage"))


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def alias(uri: str, name: str) -> str | None:
    try:
        return str(client(uri).get_model_version_by_alias(NAME, name).version)
    except Exception:
        return None


def versions(uri: str) -> list[str]:
    return sorted(str(v.version) for v in client(uri).search_model_versions(f"name='{NAME}'"))


def tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(client(uri).get_run(run_id).data.tags)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# --- the gate, without training ---------------------------------------------------------


@pytest.mark.parametrize(("task", "metric", "want"), [
    ("classification", "val_loss", ("test_loss", "min")),
    ("regression", "val_loss", ("test_rmse", "min")),
    ("classification", "val_accuracy", ("test_accuracy", "max")),
    ("regression", "val_rmse", ("test_rmse", "min")),
])
def test_gate_metric_follows_tune_metric_and_task(tmp_path: Path, task: str, metric: str,
                                                   want: tuple[str, str]) -> None:
    spec = load_spec(write_spec(tmp_path, tmp_path / "x.csv", "sqlite:///x.db"),
                     {"data.task": task, "tune.metric": metric})
    gate = gate_for(spec)
    assert (gate.metric, gate.mode, gate.threshold) == (*want, 0.002)


LOSS, ACC = Gate("test_loss", "min", 0.01), Gate("test_accuracy", "max", 0.01)


@pytest.mark.parametrize(("gate", "champion", "challenger", "first", "promote", "reason"), [
    (LOSS, 0.50, 0.45, False, True, "better by 0.05 >="),
    (LOSS, 0.50, 0.495, False, False, "better by only 0.005 <"),
    (LOSS, 0.50, 0.60, False, False, "not better"),
    (LOSS, 0.50, 0.50, False, False, "not better"),
    (ACC, 0.80, 0.82, False, True, "better by 0.02"),
    (ACC, 0.80, 0.75, False, False, "not better"),
    (LOSS, 0.50, math.nan, False, False, "challenger failed evaluation: test_loss is nan"),
    (LOSS, 0.50, math.inf, False, False, "challenger failed evaluation"),
    (LOSS, None, 0.70, True, True, "promoted: first model"),
    (LOSS, None, math.nan, True, False, "challenger failed evaluation"),
    (LOSS, math.nan, 0.70, False, True, "champion failed evaluation"),
])
def test_decide(gate: Gate, champion: float | None, challenger: float, first: bool,
                promote: bool, reason: str) -> None:
    d = decide(gate, champion, challenger, first_model=first)
    assert d.promote is promote
    assert reason in d.reason


def test_decide_blocker_keeps_even_a_better_model() -> None:
    d = decide(LOSS, 0.5, 0.1, first_model=False, blocker="the data changed")
    assert (d.promote, d.reason) == (False, "the data changed")


@pytest.mark.parametrize(("text", "value"), [
    ("0.001", 0.001), ("1e-05", 1e-05), ("[64, 32]", [64, 32]), ("median", "median"),
    ("True", True), ("3", 3), ("[[64], [128, 64]]", [[64], [128, 64]]),
])
def test_parse_param_reads_back_what_mlflow_stored(text: str, value: Any) -> None:
    assert parse_param(text) == value
    assert parse_param(str(value)) == value  # params are logged as str(value)


def test_a_second_lock_of_the_same_spec_is_refused_at_once(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, tmp_path / "x.csv", "sqlite:///x.db"))
    assert str(lock_path(spec)) == str(tmp_path / "storage" / NAME / "retrain.lock")
    with retrain_lock(spec), pytest.raises(UserError, match="another retrain"):
        with retrain_lock(spec):
            pass
    with retrain_lock(spec):  # released on leaving the block
        pass


def test_a_lease_left_by_a_dead_holder_expires(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    spec = load_spec(write_spec(tmp_path, tmp_path / "x.csv", "sqlite:///x.db"))
    held = lock_path(spec)
    held.parent.mkdir()
    crashed = {"owner": "elsewhere-1", "host": "another-machine", "pid": 1}
    held.write_text(json.dumps({**crashed, "expires": time.time() + 60}))
    with pytest.raises(UserError, match="another retrain .* held by another-machine pid 1"):
        with retrain_lock(spec):
            pass
    held.write_text(json.dumps({**crashed, "expires": time.time() - 1}))  # stopped renewing
    with retrain_lock(spec):
        assert json.loads(held.read_text())["host"] != "another-machine"
    assert not held.is_file()


# --- refit: no Ray ------------------------------------------------------------------------


def test_refit_first_model_then_promotes_champion_config_on_better_data(
        tmp_path: Path, mlflow_uri: str, data: dict[str, Path]) -> None:
    path = write_spec(tmp_path, data["noisy"], mlflow_uri, retrain="refit")
    first = retrain(load_spec(path))
    assert (first.decision.promote, first.decision.reason) == (True, "promoted: first model")
    assert alias(mlflow_uri, "champion") == first.champion_after == "1"
    assert tags(mlflow_uri, first.run_id)["rungwise.decision"] == "promoted"
    # the champion's configuration is what a refit trains again
    client(mlflow_uri).log_param(first.run_id, "best.model.hidden", "[8]")

    second = retrain(load_spec(path, {"data.path": str(data["good"])}))
    assert second.warm_start == [{"model.hidden": [8]}]
    run = client(mlflow_uri).get_run(second.run_id)
    assert run.data.params["model.hidden"] == "[8]"
    assert run.data.tags["rungwise.retrain"] == "refit"
    d = second.decision
    assert d.promote and d.gain is not None and d.gain >= 0.002, d
    assert alias(mlflow_uri, "champion") == second.champion_after == "2"
    t = run.data.tags
    assert t["rungwise.decision"] == "promoted"
    assert float(t["rungwise.champion_score"]) - float(t["rungwise.challenger_score"]) >= 0.002
    assert "better by" in t["rungwise.reason"]


CRASH = "injected crash right before promotion, by the test"


def crash_before_promote(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies at the one registry write that moves ``champion`` (jobs/retrain.py's
    ``promote``), before MLflow sees it; every write before it is real."""
    from mlflow.tracking import MlflowClient

    real = MlflowClient.set_registered_model_alias

    def set_alias(self: Any, name: str, alias: str, version: Any) -> None:
        if alias == "champion":
            raise RuntimeError(CRASH)
        real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_alias)


def test_crash_before_promote_leaves_the_champion(
        tmp_path: Path, mlflow_uri: str, data: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_spec(tmp_path, data["noisy"], mlflow_uri, retrain="refit")
    retrain(load_spec(path))
    crash_before_promote(monkeypatch)
    spec = load_spec(path, {"data.path": str(data["good"])})
    with pytest.raises(RuntimeError, match=CRASH):
        retrain(spec)
    assert alias(mlflow_uri, "champion") == "1"
    assert alias(mlflow_uri, "challenger") == "2"
    crashed = client(mlflow_uri).get_model_version(NAME, "2").run_id
    assert tags(mlflow_uri, crashed)["rungwise.decision"] == "promoting"  # never "promoted"
    assert not lock_path(spec).is_file()  # the lease is released


# --- the CLI: one-line errors, exit 2, nothing changed -----------------------------------


def test_bad_data_changes_nothing_and_exits_2(tmp_path: Path, mlflow_uri: str,
                                              data: dict[str, Path]) -> None:
    path = write_spec(tmp_path, data["good"], mlflow_uri, retrain="refit")
    retrain(load_spec(path))
    before = (versions(mlflow_uri), alias(mlflow_uri, "champion"),
              alias(mlflow_uri, "challenger"))
    broken = tmp_path / "broken.csv"
    broken.write_text("age,workclass\n1,2,3,4\nnot a table\n")
    out = cli("retrain", str(path), "--set", f"data.path={broken}",
              "--set", "schedule.retrain=sweep", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rungwise: error: data.path"), out.stderr
    after = (versions(mlflow_uri), alias(mlflow_uri, "champion"),
             alias(mlflow_uri, "challenger"))
    assert after == before == (["1"], "1", "1")


def test_second_retrain_exits_2_while_the_lock_is_held(tmp_path: Path, mlflow_uri: str,
                                                       data: dict[str, Path]) -> None:
    path = write_spec(tmp_path, data["good"], mlflow_uri, retrain="refit")
    with retrain_lock(load_spec(path)):  # held by this process, seen through the storage
        started = time.perf_counter()
        out = cli("retrain", str(path), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "another retrain of 'retrain-test' is running" in err[0], err
    assert "--wait" in err[0]
    assert time.perf_counter() - started < 120
    assert client(mlflow_uri).search_registered_models() == []


def test_wait_blocks_until_the_lock_is_released(tmp_path: Path, mlflow_uri: str) -> None:
    broken = tmp_path / "broken.csv"
    broken.write_text("")
    path = write_spec(tmp_path, broken, mlflow_uri, retrain="refit")
    lock = retrain_lock(load_spec(path))
    lock.__enter__()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "retrain", str(path), "--wait"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "rungwise retrain" in proc.stdout.readline()
        time.sleep(2)
        assert proc.poll() is None  # waiting on the lock
    finally:
        lock.__exit__(None, None, None)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "data.path" in err  # got the lock, then read the data


# --- sweep: real Ray ----------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_retrain_promotes_better_model(ray_session: None, tmp_path: Path,
                                             mlflow_uri: str, data: dict[str, Path]) -> None:
    from tuning.sweep import _state_path

    path = write_spec(tmp_path, data["noisy"], mlflow_uri, retrain="sweep")
    assert lock_path(load_spec(path)) == _state_path(load_spec(path)).parent / "retrain.lock"
    first = retrain(load_spec(path), quiet=True)
    assert first.decision.reason == "promoted: first model" and first.warm_start == []
    assert alias(mlflow_uri, "champion") == "1"
    lr = parse_param(client(mlflow_uri).get_run(first.run_id).data.params["best.train.lr"])

    second = retrain(load_spec(path, {"data.path": str(data["good"])}), quiet=True)
    assert second.warm_start == [{"train.lr": lr}]  # the champion's best configuration
    t = tags(mlflow_uri, second.run_id)
    assert t["rungwise.kind"] == "retrain" and "train.lr" in t["rungwise.warm_start"]
    assert t["rungwise.decision"] == "promoted", t["rungwise.reason"]
    assert float(t["rungwise.champion_score"]) - float(t["rungwise.challenger_score"]) >= 0.002
    assert alias(mlflow_uri, "champion") == second.champion_after == "2"
    assert client(mlflow_uri).get_model_version(NAME, "2").run_id == second.run_id


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_retrain_keeps_champion_over_worse_model(ray_session: None, tmp_path: Path,
                                                       mlflow_uri: str,
                                                       data: dict[str, Path]) -> None:
    path = write_spec(tmp_path, data["good"], mlflow_uri, retrain="sweep")
    retrain(load_spec(path), quiet=True)
    second = retrain(load_spec(path, {"data.path": str(data["noisy"])}), quiet=True)
    d = second.decision
    assert not d.promote and "not better" in d.reason, d
    assert d.champion_score is not None and d.challenger_score > d.champion_score + 0.01
    t = tags(mlflow_uri, second.run_id)
    assert t["rungwise.decision"] == "kept"
    assert float(t["rungwise.challenger_score"]) == pytest.approx(d.challenger_score, abs=1e-6)
    assert alias(mlflow_uri, "champion") == second.champion_after == "1"
    assert alias(mlflow_uri, "challenger") == "2"
