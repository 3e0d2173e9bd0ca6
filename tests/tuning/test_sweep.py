"""Real sweeps on a real local Ray instance with a real MLflow store."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from jobs.spec import load_spec
from tests.conftest import DATA, EXAMPLES
from tuning.sweep import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL_SPACE = {"train.lr": {"choice": [3e-3, 1e-2]},
               "model.hidden": {"choice": [[16], [32, 16]]}}


def small_spec(tmp_path, monkeypatch, uri=None, **overrides):
    monkeypatch.setenv("RUNGWISE_STORAGE", str(tmp_path / "runs"))
    base = {"train.epochs": 3, "train.early_stopping": None, "tune.num_samples": 3,
            "tune.max_concurrent": 2, "tune.search": "random", "tune.space": SMALL_SPACE,
            "tracking.uri": uri, "tracking.register_as": "adult-test", "model.hidden": [16]}
    return load_spec(EXAMPLES / "adult.yaml").with_overrides({**base, **overrides})


def children(uri, parent_id):
    cl = MlflowClient(uri)
    exp = cl.get_run(parent_id).info.experiment_id
    return cl.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=500)


@pytest.mark.parametrize("search", ["grid", "random", "bayes", "asha", "hyperband", "bohb",
                                    "median", "pbt", "auto"])
def test_every_strategy_runs_a_small_sweep(ray_session, tmp_path, monkeypatch, search):
    # two trials run at once (grid: its four combinations): one wave of trial start-ups
    spec = small_spec(tmp_path, monkeypatch, **{"tune.search": search, "tune.num_samples": 2})
    result = run_sweep(spec, tracking=False, register=False, quiet=True)
    assert result.strategy == ("random" if search == "auto" else search)
    assert math.isfinite(result.best_value)
    assert result.test_metrics["test_accuracy"] > 0.75
    assert set(result.best_overrides) == set(SMALL_SPACE)


def test_sweep_is_mirrored_in_mlflow(ray_session, tmp_path, monkeypatch, mlflow_uri):
    spec = small_spec(tmp_path, monkeypatch, mlflow_uri, **{"tune.num_samples": 4})
    result = run_sweep(spec, quiet=True)
    cl = MlflowClient(mlflow_uri)
    parent = cl.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["rungwise.strategy"] == "random"
    assert len(parent.data.tags["rungwise.data_fingerprint"]) == 16
    kids = children(mlflow_uri, result.parent_run_id)
    assert len(kids) == 4
    assert len({k.data.tags["rungwise.trial_id"] for k in kids}) == 4
    assert {k.info.status for k in kids} == {"FINISHED"}
    assert {k.data.tags["rungwise.status"] for k in kids} == {"finished"}
    for kid in kids:
        history = cl.get_metric_history(kid.info.run_id, "val_loss")
        assert [m.step for m in history] == [1, 2, 3]
        assert set(kid.data.params) == set(SMALL_SPACE)
    best = [k for k in kids if k.data.tags.get("rungwise.best_trial") == "true"]
    assert len(best) == 1
    assert parent.data.tags["rungwise.best_run_id"] == best[0].info.run_id
    arts = {a.path for a in cl.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "val_curves.png", "spec.yaml"} <= arts
    logged = mlflow.get_logged_model(result.model_uri.split("/")[-1])
    assert logged.source_run_id == result.parent_run_id
    assert "test_accuracy" in parent.data.metrics
    csv = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=result.parent_run_id, artifact_path="trials.csv", tracking_uri=mlflow_uri))
    assert len(csv) == 4 and csv["best"].sum() == 1
    # the same sweep's registered model (one sweep, two tests' checks)
    registered_model_predicts_raw_rows_with_missing_values(result, spec, tmp_path,
                                                           monkeypatch, mlflow_uri)


def registered_model_predicts_raw_rows_with_missing_values(result, spec, tmp_path, monkeypatch,
                                                           mlflow_uri):
    """The first sweep into a fresh store registers its best model as champion; it predicts
    raw rows with missing values; a second sweep is only a challenger."""
    assert result.aliases == ["challenger", "champion"]
    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pyfunc.load_model("models:/adult-test@champion")
    raw = pd.read_csv(DATA / "adult" / "adult-test.csv.gz", header=None,
                      names=spec.data.columns, skipinitialspace=True, na_values="?")
    rows = raw.drop(columns=["income"])
    rows = pd.concat([rows[rows.isna().any(axis=1)].head(50), rows.head(200)])
    rows = rows.astype({c: "float64" for c in rows.select_dtypes("number")})  # signature: double
    assert rows.isna().any(axis=1).sum() >= 50
    pred = np.asarray(model.predict(rows))
    assert len(pred) == len(rows)
    assert set(pred) <= {"<=50K", ">50K"}
    truth = raw.loc[rows.index, "income"].str.rstrip(".")
    assert (pred == truth.to_numpy()).mean() > 0.75
    # a second sweep is only a challenger: the champion stays
    again = run_sweep(small_spec(tmp_path, monkeypatch, mlflow_uri, **{"tune.num_samples": 2}),
                      quiet=True)
    assert again.aliases == ["challenger"]
    cl = MlflowClient(mlflow_uri)
    assert str(cl.get_model_version_by_alias("adult-test", "champion").version) == "1"
    assert str(cl.get_model_version_by_alias("adult-test", "challenger").version) == "2"


def test_mlflow_server_http_path(ray_session, tmp_path, monkeypatch, mlflow_server):
    spec = small_spec(tmp_path, monkeypatch, mlflow_server, **{"tune.num_samples": 2,
                                                               "tracking.register_as": "http"})
    result = run_sweep(spec, quiet=True)
    kids = children(mlflow_server, result.parent_run_id)
    assert len(kids) == 2 and {k.info.status for k in kids} == {"FINISHED"}
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/http@champion")
    raw = pd.read_csv(DATA / "adult" / "adult-test.csv.gz", header=None,
                      names=spec.data.columns, skipinitialspace=True, na_values="?").head(20)
    raw = raw.astype({c: "float64" for c in raw.select_dtypes("number")})  # signature: double
    assert len(model.predict(raw.drop(columns=["income"]))) == 20


def test_unreachable_server_fails_before_any_trial(tmp_path, monkeypatch):
    from tests.conftest import free_port
    from tuning.errors import TrackingError

    spec = small_spec(tmp_path, monkeypatch, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError, match="not reachable"):
        run_sweep(spec, quiet=True)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pkl"))
