"""tune.storage without a cluster: what it opens, what a tampered state file gets, and the
one-line errors (fast: nothing here starts Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.spec import SpecError, load_spec
from tests.cluster.conftest import BUCKET, S3
from tests.cluster.test_two_nodes import NAME, write_spec
from tests.conftest import ROOT
from tuning.errors import RungwiseError
from tuning.storage import child_of, open_storage


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=300,
                          env={"PATH": str(Path(sys.executable).parent), "HOME": str(cwd),
                               "PYTHONPATH": str(ROOT)})


def test_local_paths_and_file_uris_are_one_local_folder(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNGWISE_STORAGE", raising=False)
    assert open_storage().root == str(tmp_path / "rungwise-runs")  # the working directory
    monkeypatch.setenv("RUNGWISE_STORAGE", "elsewhere")
    assert open_storage().root == str(tmp_path / "elsewhere")
    assert open_storage("runs").root == str(tmp_path / "runs")  # tune.storage wins
    uri = open_storage(f"file://{tmp_path}/runs")
    assert uri.local and str(uri.path("x", "y")) == f"{tmp_path}/runs/x/y"
    state = uri.path("x", "state.json")
    state.parent.mkdir()
    state.write_text("{}")
    assert (tmp_path / "runs" / "x" / "state.json").read_text() == "{}"


def test_an_object_store_uri_is_never_a_local_path(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s3 = open_storage("s3://bucket/prefix?region=us-east-1&endpoint_override=127.0.0.1:9")
    assert (s3.scheme, s3.root, s3.local) == ("s3", "bucket/prefix", False)
    path = s3.path("spec", "rungwise-sweep.json")
    assert str(path) == ("s3://bucket/prefix/spec/rungwise-sweep.json?region=us-east-1"
                         "&endpoint_override=127.0.0.1:9")  # what a worker's from_uri opens
    assert path.shown == "s3://bucket/prefix/spec/rungwise-sweep.json"
    assert not list(tmp_path.iterdir())  # no folder named s3:


def test_resume_only_restores_a_folder_under_the_spec_folder() -> None:
    folder = open_storage("s3://bucket/runs?region=us-east-1").path(NAME)
    assert str(child_of(folder, f"s3://bucket/runs/{NAME}/sweep-1")).startswith(
        f"s3://bucket/runs/{NAME}/sweep-1")
    for named in ("/tmp/evil/sweep-1", f"s3://bucket/runs/{NAME}/../other/sweep-1",
                  f"s3://other/runs/{NAME}/sweep-1", "", None, f"s3://bucket/runs/{NAME}"):
        with pytest.raises(RungwiseError, match="refusing to restore"):
            child_of(folder, named)


def test_tampered_state_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = write_spec(tmp_path, uri)
    evil = tmp_path / "elsewhere" / "sweep-1"
    evil.mkdir(parents=True)
    (evil / "tuner.pkl").write_bytes(b"not a sweep: restoring would unpickle this")
    state = tmp_path / "runs" / NAME / "rungwise-sweep.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"experiment_path": str(evil), "parent_run_id": None}))
    out = cli(tmp_path, "tune", str(spec), "--resume", "--set",
              f"tune.storage={tmp_path / 'runs'}")
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rungwise: error: --resume:"), out.stderr
    assert str(evil) in lines[0] and "refusing to restore" in lines[0]


def test_a_storage_pyarrow_cannot_open_is_one_line(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = cli(tmp_path, "tune", str(spec), "--set", "tune.storage=nope://bucket/x")
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "tune.storage: cannot open 'nope://bucket/x'" in lines[0]


def test_credentials_in_the_storage_uri_are_refused(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "sqlite:///x.db")
    with pytest.raises(SpecError, match="tune.storage: credentials do not belong"):
        load_spec(spec, {"tune.storage": "s3://b/p?access_key=a&secret_key=b"})


def test_data_path_may_be_an_object_store_uri(moto_s3: S3, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    from trainer.data import read_table

    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    fs = moto_s3.fs()
    local = load_spec(write_spec(tmp_path, "sqlite:///x.db")).data
    with open(local.path, "rb") as src, \
            fs.open_output_stream(f"{BUCKET}/data/adult.csv.gz",
                                compression=None) as dst:  # type: ignore
        dst.write(src.read())
    expected = read_table(local)
    from_bucket = read_table(local.model_copy(update={"path": f"s3://{BUCKET}/data/adult.csv.gz"}))
    pd.testing.assert_frame_equal(from_bucket, expected)
    expected.head(100).to_parquet(tmp_path / "rows.parquet")
    with fs.open_output_stream(f"{BUCKET}/data/rows.parquet") as dst:  # type: ignore
        dst.write((tmp_path / "rows.parquet").read_bytes())
    rows = read_table(local.model_copy(update={"path": f"s3://{BUCKET}/data/rows.parquet",
                                               "columns": None}))
    assert rows.shape == (100, expected.shape[1])
