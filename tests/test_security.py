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


# One table: every shape of secret the issue names (#17), input -> exact masked output.
# S marks every secret; the host, path and the other parameters must survive as they were.
S = "Zq9sEcReT"
TOKEN = "ghp_" + "A1b2C3d4E5f6" + S
AMZ = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={c}&X-Amz-Date=20250101T000000Z"
       "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token={t}"
       "&X-Amz-Signature={s}")
MASK_TABLE = [
    # user:password@, the password holding the characters urllib splits on
    (f"http://user:{S}@host", f"http://user:{MASK}@host"),
    (f"https://user:ab/{S}@mlflow.example.com/api", f"https://user:{MASK}@mlflow.example.com/api"),
    (f"http://user:a#{S}@host:5000", f"http://user:{MASK}@host:5000"),
    (f"http://user:a@b:{S}@host:5000/x?y=1", f"http://user:{MASK}@host:5000/x?y=1"),
    (f"postgresql+psycopg2://rw:{S}%2F@db:5432/mlflow", f"postgresql+psycopg2://rw:{MASK}@db:5432/mlflow"),
    # a token as the user name, alone or with a placeholder password
    (f"https://{TOKEN}@github.com/o/r.git", f"https://{MASK}@github.com/o/r.git"),
    (f"https://x-access-token:{S}@github.com/o/r", f"https://x-access-token:{MASK}@github.com/o/r"),
    (f"https://9f8e7d6c5b4a{S}:x-oauth-basic@github.com", f"https://{MASK}:{MASK}@github.com"),
    (f"https://glpat-{S}@gitlab.com/g/p", f"https://{MASK}@gitlab.com/g/p"),
    # secret query and fragment parameters, any case
    (f"http://host:5000/api?token={S}&x=1", f"http://host:5000/api?token={MASK}&x=1"),
    (f"https://host/cb#access_token={S}&state=ok", f"https://host/cb#access_token={MASK}&state=ok"),
    (f"https://h/p?API_KEY={S}", f"https://h/p?API_KEY={MASK}"),
    (f"https://h/p?apikey={S}&ApiKey={S}", f"https://h/p?apikey={MASK}&ApiKey={MASK}"),
    (f"https://h/p?key={S}&keyword=ok", f"https://h/p?key={MASK}&keyword=ok"),
    (f"https://h/p?PWD={S}&passwd={S}&Secret={S}&auth={S}",
     f"https://h/p?PWD={MASK}&passwd={MASK}&Secret={MASK}&auth={MASK}"),
    (f"https://h/p?client_secret={S}&credential={S}",
     f"https://h/p?client_secret={MASK}&credential={MASK}"),
    # presigned URLs: S3 (v4 and v2), GCS, Azure SAS
    ("https://b.s3.amazonaws.com/k.csv?" + AMZ.format(c=f"AKIA{S}%2F20250101", t=S, s=S),
     "https://b.s3.amazonaws.com/k.csv?" + AMZ.format(c=MASK, t=MASK, s=MASK)),
    (f"https://s3.amazonaws.com/b/k?AWSAccessKeyId=AKIA{S}&Expires=1700000000&Signature={S}%3D",
     f"https://s3.amazonaws.com/b/k?AWSAccessKeyId={MASK}&Expires=1700000000&Signature={MASK}"),
    (f"https://storage.googleapis.com/b/o?X-Goog-Credential={S}&X-Goog-Signature={S}",
     f"https://storage.googleapis.com/b/o?X-Goog-Credential={MASK}&X-Goog-Signature={MASK}"),
    (f"https://a.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&se=2030-01-01&sig={S}%3D",
     f"https://a.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&se=2030-01-01&sig={MASK}"),
    # libpq: URI parameters and key=value DSNs (quoted values keep their quotes)
    (f"postgresql://rw@db:5432/mlflow?sslmode=verify-full&sslpassword={S}",
     f"postgresql://rw@db:5432/mlflow?sslmode=verify-full&sslpassword={MASK}"),
    (f"postgresql://rw@db/mlflow?password={S}", f"postgresql://rw@db/mlflow?password={MASK}"),
    (f"host=db port=5432 user=rw password={S} dbname=mlflow",
     f"host=db port=5432 user=rw password={MASK} dbname=mlflow"),
    (f"host=db password='{S} with spaces' sslpassword = {S} dbname=mlflow",
     f"host=db password='{MASK}' sslpassword = {MASK} dbname=mlflow"),
    (f"jdbc:postgresql://db/mlflow;user=rw;password={S}",
     f"jdbc:postgresql://db/mlflow;user=rw;password={MASK}"),
    # URIs urllib cannot parse are masked all the same
    (f"http://user:{S}@[::1:5000/x", f"http://user:{MASK}@[::1:5000/x"),
    (f"http://[::1/x?token={S}", f"http://[::1/x?token={MASK}"),
    # secrets inside free text: an error message, a printed dict
    (f"cannot reach http://u:{S}@host:5000 (refused); retry with token={S}",
     f"cannot reach http://u:{MASK}@host:5000 (refused); retry with token={MASK}"),
    (f"{{'password': '{S}', 'lr': 0.1, \"api_key\": \"{S}\"}}",
     f"{{'password': '{MASK}', 'lr': 0.1, \"api_key\": \"{MASK}\"}}"),
]
NO_SECRET = [
    "sqlite:////abs/path/mlflow.db", "sqlite:///relative.db", "file:///tmp/x", "file:/tmp/x",
    "s3://bucket/prefix/data.csv", "gs://bucket/a/b.parquet", "http://host:5000",
    "http://127.0.0.1:5000/", "https://user@host", "ssh://git@github.com/o/r.git",
    "postgresql://postgres@db:5432/mlflow?sslmode=require", "mysql://mlflow@db/mlflow",
    "host=db port=5432 dbname=mlflow user=rw sslmode=require", "databricks",
    "databricks://profile", "models:/adult@champion", "runs:/0123abcd/model",
    "mlflow-artifacts:/1/abc/artifacts", "http://host:5000/#/experiments/1/runs/abc",
    "https://h/p?keyword=a&monkey=b&sign=c&author=d&passage=", "", "a = b, lr=0.1",
    "tune.space.train.lr: loguniform bounds must be positive, got [0, 0.1]",
]


@pytest.mark.parametrize(("text", "masked"), MASK_TABLE)
def test_mask_table(text: str, masked: str) -> None:
    assert S in text  # the case does hold a secret ...
    got = mask_uri(text)
    assert got == masked
    assert S not in got  # ... and none is left
    assert mask_uri(got) == got  # masking is idempotent


@pytest.mark.parametrize("text", NO_SECRET)
def test_mask_leaves_text_without_secrets_alone(text: str) -> None:
    assert mask_uri(text) == text


def test_mask_never_raises_and_never_leaks_on_random_text() -> None:
    """Random text around a known secret: the result is a string without the secret."""
    import random

    rng = random.Random(17)
    alphabet = "ab:/@?#&=;%[]' \"\\.-_+09\n\t"
    for _ in range(3000):
        noise = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
                 for _ in range(3)]
        shape = rng.choice([f"http://u:{{0}}{S}{{1}}@h{{2}}", f"{{0}}?token={S}{{1}}",
                            f"{{0}} password={S}{{2}}", f"https://{TOKEN}@{{1}}",
                            f"{{0}}&X-Amz-Signature={S}{{2}}", f"{{0}}'password': '{S}'{{1}}",
                            f"{{0}}http://x:{{1}}{S}@{{2}}"])
        # no "@" or whitespace inside a password: those end it (and are not valid there)
        text = shape.format(*("".join(n.replace("@", "").split()) for n in noise))
        got = mask_uri(text)
        assert isinstance(got, str)
        assert S not in got, (text, got)


def test_mask_takes_linear_time() -> None:
    """A long word of schemes or names with no "@" or value must not make masking crawl
    (a backtracking pattern took 17 s on 90 kB of ``http://u:``)."""
    import time

    for text in ["http://u:" * 20_000, "a://b@" * 20_000, "?password=" * 20_000,
                 "'a': " * 20_000]:
        start = time.perf_counter()
        mask_uri(text)
        assert time.perf_counter() - start < 2.0, text[:20]


def test_mask_secrets_goes_into_tune_space_lists_and_dicts() -> None:
    flat = {
        "tune.space": {
            "impute.fill_value": {"choice": [f"postgresql://u:{S}@db/x", f"host=db password={S}",
                                             "plain"]},
            "extra.api_key": {"choice": [S]},
            "train.lr": {"loguniform": [1e-4, 1e-2]}},
        "model.hidden": [64, 32], "pair": (f"https://{TOKEN}@github.com", 1),
        "store.password": 1234, "a.token": None, "b.secret": [S], "train.lr": 0.01,
    }
    before = repr(flat)
    masked = mask_secrets(flat)
    assert repr(flat) == before  # the input is not changed
    assert masked == {
        "tune.space": {
            "impute.fill_value": {"choice": [f"postgresql://u:{MASK}@db/x",
                                             f"host=db password={MASK}", "plain"]},
            "extra.api_key": MASK,
            "train.lr": {"loguniform": [1e-4, 1e-2]}},
        "model.hidden": [64, 32], "pair": (f"https://{MASK}@github.com", 1),
        "store.password": MASK, "a.token": MASK, "b.secret": MASK, "train.lr": 0.01,
    }


def test_tracking_reexports_the_one_masking_function() -> None:
    import tuning.secrets
    import tuning.tracking

    assert tuning.tracking.mask_uri is tuning.secrets.mask_uri
    assert tuning.tracking.mask_secrets is tuning.secrets.mask_secrets
    assert tuning.tracking.MASK == MASK == "***"


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
    import pandas as pd

    from trainer import preprocessor_state
    from trainer.encode import Preprocessor
    from trainer.impute import Imputer

    frame = pd.DataFrame({"a": [1.0, 2.0, None], "b": [0.0, 1.0, 2.0], "c": [3.0, 1.0, 2.0]})
    pre = Preprocessor(Imputer(), "classification").fit(frame, pd.Series(["x", "y", "x"]))
    preprocessor_state.save(pre, bundle)
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


# --- masking on every path out: a real sweep against a real MLflow server -------------------


def test_check_reachable_sends_the_password_as_basic_auth_and_never_shows_it() -> None:
    """``user:password@`` in an http(s) tracking URI: urllib would take it for the host; the
    check sends it as MLflow's client does, and its errors show it masked."""
    import base64
    import http.server
    import threading

    from tests.conftest import free_port
    from tuning.errors import TrackingError
    from tuning.tracking import check_reachable

    seen: list[tuple[str, str | None]] = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://rw:p%40{S}@127.0.0.1:{server.server_address[1]}/mlflow/")
    finally:
        server.shutdown()
    assert seen == [("/mlflow/health", "Basic " + base64.b64encode(f"rw:p@{S}".encode()).decode())]
    port = free_port()
    with pytest.raises(TrackingError) as err:
        check_reachable(f"http://rw:{S}@127.0.0.1:{port}")
    assert str(err.value).startswith(f"tracking.uri: MLflow server http://rw:{MASK}@127.0.0.1:"
                                     f"{port} is not reachable")
    assert S not in str(err.value)


def _rungwise(args: list[str], cwd: Path) -> Any:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RUNGWISE_DEBUG", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", RUNGWISE_STORAGE=str(cwd / "runs"))
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def _everything_mlflow_holds(uri: str, parent_id: str, dst: Path) -> list[str]:
    """Params, tags and every artifact (spec.yaml, trials.csv, the model) of the parent run
    and its trials, and the registry's versions of the model, as text."""
    import mlflow
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(uri)
    parent = cl.get_run(parent_id)
    kids = cl.search_runs([parent.info.experiment_id],
                          f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(kids) == 2
    texts = [repr((r.data.params, r.data.tags, r.info.run_name)) for r in [parent, *kids]]
    local = Path(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="",
                                                     dst_path=str(dst), tracking_uri=uri))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert {"spec.yaml", "trials.csv"} <= {p.name for p in files}
    texts += [p.read_bytes().decode("latin-1") for p in files]
    texts += [repr(v) for v in cl.search_model_versions("name = 'masked-e2e'")]
    texts.append(repr(cl.get_experiment(parent.info.experiment_id)))
    return texts


@pytest.mark.slow
@pytest.mark.ray
def test_no_secret_leaves_a_sweep_on_any_path(tmp_path: Path, mlflow_server: str) -> None:
    """`rungwise tune` with a password in tracking.uri (the server ignores it), URIs with
    secrets in tune.space and a DSN password in a --set value; then `rungwise predict` with
    an alias that does not exist (the registry error). None of the secrets appears in stdout,
    stderr, the runs' params and tags, spec.yaml or any other artifact, the registry, or
    rungwise-sweep.json; their masked forms do."""
    import json

    import yaml

    pw, in_space, token, in_set = (f"{S}Track", f"{S}Space", f"{S}Tok", f"{S}Set")
    uri = mlflow_server.replace("http://", f"http://rungwise:{pw}@")
    shown = mlflow_server.replace("http://", f"http://rungwise:{MASK}@")
    space = {"train.lr": {"choice": [3e-3, 1e-2]},
             "impute.fill_value": {"choice": [f"postgresql://u:{in_space}@db/x",
                                              f"https://ghp_{token}@github.com/o/r"]}}
    spec = ROOT / "tests" / "jobs" / "tiny_adult.yaml"
    # numeric drop_rows: the string fill_value then only reaches categorical columns
    sets = [f"tracking.uri={uri}", "tracking.register_as=masked-e2e", "tune.max_concurrent=2",
            "impute.numeric=drop_rows", "impute.categorical=constant",
            f"tune.space={json.dumps(space)}", f"impute.fill_value=host=db password={in_set}"]
    tune = _rungwise(["tune", str(spec), *[a for s in sets for a in ("--set", s)]], tmp_path)
    assert tune.returncode == 0, tune.stderr[-3000:]
    assert f"at {shown}" in tune.stdout, tune.stdout[-2000:]
    predict = _rungwise(["predict", str(spec), "--set", f"tracking.uri={uri}", "--set",
                         "tracking.register_as=masked-e2e", "--input", str(spec), "--alias",
                         "nosuch"], tmp_path)
    assert predict.returncode == 2
    assert predict.stderr.strip() == (f"rungwise: error: registry: no model version "
                                      f"masked-e2e@nosuch at {shown}; run `rungwise tune` first "
                                      "or pick another --alias")
    state_file = tmp_path / "runs" / "rungwise-submit-test" / "rungwise-sweep.json"
    state = json.loads(state_file.read_text())
    assert set(state) == {"experiment_path", "parent_run_id", "tracking", "spec"}
    outputs = [tune.stdout, tune.stderr, predict.stdout, predict.stderr,
               state_file.read_text()]
    held = _everything_mlflow_holds(mlflow_server, state["parent_run_id"], tmp_path / "art")
    for secret in (pw, in_space, token, in_set):
        leaks = [t for t in outputs + held if secret in t]
        assert not leaks, f"{secret} leaked: {[t[:300] for t in leaks]}"
    # the masked forms are there: the checks above looked at the right things
    spec_yaml = yaml.safe_load(next((tmp_path / "art").rglob("spec.yaml")).read_text())
    assert spec_yaml["tracking"]["uri"] == shown
    assert spec_yaml["impute"]["fill_value"] == f"host=db password={MASK}"
    assert spec_yaml["tune"]["space"]["impute.fill_value"]["choice"] == [
        f"postgresql://u:{MASK}@db/x", f"https://{MASK}@github.com/o/r"]
