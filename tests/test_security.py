"""Security properties: secrets never reach MLflow, YAML never builds Python objects, torch
files never unpickle code, and rungwise binds nothing to every interface."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.spec import SpecError, load_spec, parse_overrides
from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tuning.tracking import MASK, mask_secrets, mask_uri

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret"
ALL_INTERFACES = re.compile(r"0\.0\.0\.0|host\s*=\s*['\"]::['\"]")


# --- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "masked"), [
    (f"http://user:{SECRET}@host", f"http://user:{MASK}@host"),
    (f"https://user:{SECRET}@mlflow.example.com:5000/path?x=1",
     f"https://user:{MASK}@mlflow.example.com:5000/path?x=1"),
    (f"postgresql+psycopg2://rw:{SECRET}@db:5432/mlflow",
     f"postgresql+psycopg2://rw:{MASK}@db:5432/mlflow"),
    (f"http://user:{SECRET}@{SECRET}host", f"http://user:{MASK}@{SECRET}host"),
    ("http://user:p@ss@host", f"http://user:{MASK}@host"),  # an unescaped @ in the password
])
def test_mask_uri_hides_the_password(uri: str, masked: str) -> None:
    assert mask_uri(uri) == masked


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000",
                                 "https://user@host", "databricks", "file:///tmp/x"])
def test_mask_uri_leaves_uris_without_a_password(uri: str) -> None:
    assert mask_uri(uri) == uri


def test_mask_secrets_by_key_and_inside_uris() -> None:
    flat = {"tracking.uri": f"http://u:{SECRET}@host", "store.password": SECRET,
            "x.passwd": SECRET, "a.token": SECRET, "a.api_key": SECRET, "a.API-KEY": SECRET,
            "b.secret_access_key": SECRET, "c.private_key": SECRET,
            "d.credentials": SECRET, "data.path": f"s3://key:{SECRET}@bucket/t.csv",
            "train.lr": 0.1, "model.hidden": [8], "name": "adult"}
    masked = mask_secrets(flat)
    assert set(masked) == set(flat)
    assert SECRET not in repr(masked)
    assert masked["store.password"] == MASK and masked["a.API-KEY"] == MASK
    assert masked["tracking.uri"] == f"http://u:{MASK}@host"
    assert (masked["train.lr"], masked["model.hidden"], masked["name"]) == (0.1, [8], "adult")


def test_a_section_named_like_a_secret_does_not_mask_its_plain_keys() -> None:
    """Only the last part of the key decides: ``token.lifetime`` is not a secret."""
    assert mask_secrets({"token.lifetime": 5}) == {"token.lifetime": 5}


@pytest.mark.slow
def test_logged_params_never_hold_the_secret(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from tuning.tracking import log_params

    cl = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = cl.create_run(cl.create_experiment("secrets"))
    flat = {"tracking.uri": f"http://user:{SECRET}@mlflow.internal:5000",
            "data.path": f"s3://key:{SECRET}@bucket/t.csv", "extra.api_key": SECRET,
            "train.lr": 0.01}
    log_params(cl, run.info.run_id, flat)
    params = cl.get_run(run.info.run_id).data.params
    assert set(params) == set(flat)
    assert all(SECRET not in v for v in params.values()), params
    assert params["tracking.uri"] == f"http://user:{MASK}@mlflow.internal:5000"
    assert params["train.lr"] == "0.01"


# --- YAML: data only, never code ------------------------------------------------------------


def test_python_tag_in_a_spec_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n"
                    "data: {path: /t.csv}\n")
    with pytest.raises(SpecError, match="could not determine a constructor for the tag"):
        load_spec(spec)
    assert not marker.exists()


def test_python_tag_in_a_set_override_stays_text(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    got = parse_overrides([f"name=!!python/object/apply:os.system ['touch {marker}']"])
    assert isinstance(got["name"], str)
    assert not marker.exists()


# --- torch files: weights only ---------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a planted weights file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _malicious(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    return path


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Without weights_only the file does run code: the refusals below mean something."""
    marker = tmp_path / "marker"
    path = _malicious(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_checkpoint_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = _malicious(tmp_path / "ckpt.pt", marker)
    with pytest.raises(CheckpointError, match="refused to load: it holds objects other than"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_checkpoint_reads_plain_checkpoints(tmp_path: Path) -> None:
    ckpt = {"model": {"w": torch.arange(3.0)}, "epoch": 4, "history": [{"val_loss": 0.5}]}
    got = load_checkpoint(save_checkpoint(ckpt, tmp_path / "ok.pt"))
    assert torch.equal(got["model"]["w"], torch.arange(3.0)) and got["epoch"] == 4


def test_save_checkpoint_refuses_objects(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint\.extra: _Payload is not allowed"):
        save_checkpoint({"extra": _Payload(tmp_path / "m")}, tmp_path / "x.pt")


def test_model_bundle_refuses_malicious_weights(tmp_path: Path) -> None:
    import json

    from trainer.bundle import ModelBundle

    marker = tmp_path / "marker"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({
        "model_spec": {"kind": "mlp", "hidden": [4]}, "input_shape": [3], "n_outputs": 2,
        "task": "classification", "feature_columns": ["a", "b", "c"]}))
    with open(bundle / "preprocessor.pkl", "wb") as fh:
        pickle.dump(None, fh)
    _malicious(bundle / "weights.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ModelBundle.load(bundle)
    assert not marker.exists()


# --- no server on every interface -------------------------------------------------------------


def test_no_code_binds_to_all_interfaces() -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for package in ("jobs", "tuning", "trainer")
            for p in sorted((ROOT / package).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if ALL_INTERFACES.search(line)]
    assert hits == []


def test_the_scan_would_see_a_binding() -> None:
    """The pattern above matches the ways such a binding is written."""
    for line in ('ray.init(dashboard_host="0.0.0.0")', "--host 0.0.0.0", "server(host='::')"):
        assert ALL_INTERFACES.search(line), line
