"""`rungwise drift` and `schedule.trigger: drift` end to end, against a real SQLite registry.

One small model (2,000 adult rows, one epoch of a [8] MLP, ``schedule.retrain: refit``, no Ray)
is trained by a first retrain; then the same rows are compared (no drift), the rows with age
moved by one standard deviation (drift: age), a retrain is skipped (run through
`rungwise schedule`'s own child process) and one retrains, a file that fails the quality gate is
refused, and a model registered without a profile gets a clear message.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from jobs.cli import main
from jobs.retrain import RetrainResult, retrain
from jobs.schedule import retrain_argv, run_schedule
from jobs.spec import load_spec
from tests.jobs.test_schedule import FakeClock, FakeStopper

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
           "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
           "hours_per_week", "native_country", "income"]
NAME = "drift-test"
pytestmark = pytest.mark.slow


def write_spec(folder: Path, data: Path, uri: str) -> Path:
    spec = {
        "name": NAME,
        "data": {"path": str(data), "target": "income", "task": "classification",
                 "na_values": ["?"], "split": {"val": 0.15, "test": 0.15, "seed": 0}},
        "impute": {"numeric": "median", "categorical": "category"},
        "model": {"kind": "mlp", "hidden": [8]},
        "train": {"epochs": 1, "batch_size": 512, "lr": 3e-3, "seed": 0},
        "tune": {"storage": str(folder / "runs")},
        "resources": {"gpus_per_worker": 0},
        "tracking": {"uri": uri, "register_as": NAME},
        "schedule": {"retrain": "refit", "trigger": "drift", "drift": {"psi": 0.2}},
    }
    path = folder / f"spec-{data.stem}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("drift")
    frame = pd.read_csv(ROOT / "data" / "adult" / "adult-train.csv.gz", header=None,
                        names=COLUMNS, skipinitialspace=True, nrows=2000)
    files = {"base": folder / "base.csv", "shifted": folder / "shifted.csv",
             "bad": folder / "bad.csv"}
    frame.to_csv(files["base"], index=False)
    moved = frame.copy()
    moved["age"] = moved["age"] + moved["age"].std()  # one standard deviation
    moved.to_csv(files["shifted"], index=False)
    bad = frame.copy()
    bad["capital_gain"] = np.nan
    bad.loc[:9, "income"] = "unknown"
    bad.to_csv(files["bad"], index=False)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    specs = {k: write_spec(folder, v, uri) for k, v in files.items()}
    first = retrain(load_spec(specs["base"]))  # no champion yet: trains the first model
    assert isinstance(first, RetrainResult) and first.champion_after == "1"
    return {"folder": folder, "uri": uri, "specs": specs, "files": files}


def client(world: dict[str, Any]) -> Any:
    import mlflow

    return mlflow.tracking.MlflowClient(tracking_uri=world["uri"])


def versions(world: dict[str, Any]) -> list[str]:
    return sorted(str(v.version) for v in client(world).search_model_versions(f"name='{NAME}'"))


def runs(world: dict[str, Any], kind: str) -> list[Any]:
    cl = client(world)
    exp = cl.get_experiment_by_name(NAME)
    return cl.search_runs([exp.experiment_id], f"tags.`rungwise.kind` = '{kind}'",
                          order_by=["attributes.start_time DESC"])


def test_drift_command_prints_a_report_logs_it_and_exits_3_on_drift(
        world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    spec, files = str(world["specs"]["base"]), world["files"]
    assert main(["drift", spec, "--input", str(files["base"]), "--fail-on-drift"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "no drift", out
    assert sorted(x.split()[0] for x in out[2:16]) == sorted(set(COLUMNS) - {"income"})
    assert main(["drift", spec, "--input", str(files["shifted"])]) == 0
    assert main(["drift", spec, "--input", str(files["shifted"]), "--fail-on-drift"]) == 3
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "drift: age"
    age = next(x for x in out if x.startswith("age "))
    assert f"DRIFT: psi {age.split()[2]} > 0.2" in age, age
    run = runs(world, "drift")[0]
    assert run.data.tags["rungwise.drift"] == "age"
    assert run.data.metrics["drift.age.psi"] > 0.2 > run.data.metrics["drift.fnlwgt.psi"]
    names = {a.path for a in client(world).list_artifacts(run.info.run_id, "drift")}
    assert names == {"drift/report.txt", "drift/report.html", "drift/report.png"}


def test_trigger_drift_skips_unchanged_data_and_retrains_on_drift(
        world: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> None:
    before = versions(world)
    clock = FakeClock(datetime(2030, 1, 1, 2, 59, tzinfo=UTC))
    argv = retrain_argv(str(world["specs"]["base"]), [])
    assert run_schedule("0 3 * * *", argv, max_runs=1, stopper=FakeStopper(clock),
                        now=clock) == 1
    out = capfd.readouterr().out
    assert "SKIPPED (no drift: 0 of 14 columns moved)" in out, out
    assert "run 1 exited 0 (ok)" in out
    assert "run 1 decision: skipped: no drift: 0 of 14 columns moved" in out, out
    skipped = runs(world, "retrain")[0]
    assert skipped.data.tags["rungwise.decision"] == "skipped"
    assert skipped.data.tags["rungwise.reason"] == "no drift: 0 of 14 columns moved"
    assert "drift.age.psi" in skipped.data.metrics
    assert versions(world) == before  # registry untouched

    result = retrain(load_spec(world["specs"]["shifted"]))
    assert isinstance(result, RetrainResult)
    assert versions(world) == sorted([*before, str(result.challenger_version)])
    run = client(world).get_run(result.run_id)
    assert run.data.tags["rungwise.trigger"] == "drift"
    assert run.data.tags["rungwise.drift"] == "age"
    assert run.data.tags["rungwise.decision"] in ("promoted", "kept")
    assert run.data.metrics["drift.age.psi"] > 0.2
    names = {a.path for a in client(world).list_artifacts(result.run_id, "drift")}
    assert "drift/report.png" in names


def test_quality_gate_refuses_bad_data_and_leaves_the_registry(
        world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    cl = client(world)
    before, champion = versions(world), cl.get_model_version_by_alias(NAME, "champion").version
    assert main(["retrain", str(world["specs"]["bad"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[:2] == ["quality: target: classes the champion never saw: 'unknown' (10 rows); "
                       "trained on '<=50K', '>50K'",
                       "quality: column 'capital_gain': 100% missing now, 0% in training"], err
    assert err[-1].startswith("rungwise: error: retrain: data quality: 2 problems in ")
    assert versions(world) == before
    assert cl.get_model_version_by_alias(NAME, "champion").version == champion
    assert runs(world, "retrain")[0].data.tags["rungwise.decision"] == "rejected"


def test_a_model_without_a_profile_gets_a_clear_message(
        world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from tuning import registry

    uri = world["uri"]
    bundle = registry.load_bundle(uri, NAME, "champion")  # reloaded: no profile_ attribute
    assert not hasattr(bundle.preprocessor, "profile_")
    cl = client(world)
    run_id = cl.create_run(cl.get_experiment_by_name(NAME).experiment_id).info.run_id
    version, _ = registry.register(uri, registry.log_bundle(run_id, bundle, None, uri), NAME,
                                   run_id)
    registry.set_alias(uri, NAME, "old", version)
    code = main(["drift", str(world["specs"]["base"]), "--input", str(world["files"]["base"]),
                 "--alias", "old"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err == (f"rungwise: error: {NAME}@old (version {version}) carries no training "
                   "profile: it was registered by a rungwise without drift checks; retrain or "
                   "re-tune it once to give it one")
