"""The registered model works wherever MLflow models go (#12): it carries its code and
installable pinned requirements, loads in a Python without rungwise, and has a typed, honest
signature that MLflow itself enforces in ``pyfunc.predict`` and in ``mlflow models serve``."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.conftest import free_port
from tests.registered import COLUMNS, LABELS, ROOT, Registered, train_and_register

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    return train_and_register(tmp_path_factory.mktemp("portable"))


def raw_rows(reg: Registered, n: int = 40) -> pd.DataFrame:
    """Rows as a client sends them: numbers as float64, ``?`` as missing, no target."""
    df = pd.read_csv(reg.data, header=None, names=COLUMNS, skipinitialspace=True,
                     na_values=["?"]).drop(columns=["income"])
    holed = df[df.isna().any(axis=1)].head(n // 2)
    rows = pd.concat([holed, df.head(n - len(holed))]).reset_index(drop=True)
    rows.loc[1, "age"] = np.nan
    numeric = ["age", "fnlwgt", "education_num", "capital_gain", "capital_loss",
               "hours_per_week"]
    return rows.astype({c: "float64" for c in numeric})


def load(reg: Registered) -> Any:
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(reg.uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/{reg.name}@champion")
    finally:
        mlflow.set_tracking_uri(before)


def local_copy(reg: Registered) -> Path:
    import mlflow

    mlflow.set_tracking_uri(reg.uri)
    dst = reg.folder / "champion"
    if not dst.exists():
        mlflow.artifacts.download_artifacts(f"models:/{reg.name}@champion", dst_path=str(dst))
    return dst


# --- portable --------------------------------------------------------------------------

CLEAN = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])  # the venv's packages, without its .pth files (no rungwise)
before = {m: importlib.util.find_spec(m) is not None for m in ("trainer", "jobs", "tuning")}
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[2])
rows = pd.read_parquet(sys.argv[3])
pred = model.predict(rows).tolist()
after = {m: importlib.util.find_spec(m) is not None for m in ("jobs", "tuning")}
print(json.dumps({"before": before, "after": after, "pred": pred,
                  "trainer": sys.modules["trainer"].__file__,
                  "sklearn": "sklearn" in sys.modules}))
"""


def test_registered_model_loads_where_rungwise_is_not_installed(model: Registered) -> None:
    """A fresh ``python -I -S`` (no PYTHONPATH, no working directory, no .pth files, so no
    editable rungwise) loads ``models:/NAME@champion`` and predicts with the trainer code
    logged inside the model."""
    rows = raw_rows(model)
    rows.to_parquet(model.folder / "rows.parquet")
    packages = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    empty = model.folder / "empty"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["MLFLOW_TRACKING_URI"] = model.uri
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", CLEAN, packages,
                           f"models:/{model.name}@champion", str(model.folder / "rows.parquet")],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] == {"trainer": False, "jobs": False, "tuning": False}
    assert out["after"] == {"jobs": False, "tuning": False}
    trainer_file = Path(out["trainer"])
    assert trainer_file.parts[-3:] == ("code", "trainer", "__init__.py"), trainer_file
    assert not trainer_file.is_relative_to(ROOT) and "/work/main" not in str(trainer_file)
    assert set(out["pred"]) <= LABELS and len(out["pred"]) == len(rows)
    # the same predictions as this checkout's rungwise makes
    assert out["pred"] == load(model).predict(rows).tolist()


def test_requirements_are_pinned_and_installable(model: Registered) -> None:
    import yaml

    path = local_copy(model)
    reqs = (path / "requirements.txt").read_text().split()
    names = [r.split("==")[0] for r in reqs]
    assert "rungwise" not in names and all("==" in r for r in reqs), reqs
    assert {"mlflow", "torch", "numpy", "pandas", "scikit-learn"} <= set(names)
    flavor = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["code"] == "code"
    assert (path / "code" / "trainer" / "bundle.py").is_file()
    logged = {p.name for p in (path / "code" / "trainer").glob("*.py")}
    assert logged == {p.name for p in (ROOT / "trainer").glob("*.py")}
    # only trainer travels: no ray, no mlflow imports in the model's code
    text = "".join(p.read_text() for p in (path / "code" / "trainer").glob("*.py"))
    assert "import ray" not in text and "import mlflow" not in text


# --- a typed, honest signature ------------------------------------------------------------


def test_signature_types_from_the_training_schema(model: Registered) -> None:
    schema = load(model).metadata.get_input_schema()
    cols = {c.name: (c.type.name, c.required) for c in schema.inputs}
    assert list(cols) == [c for c in ["age", "fnlwgt", "education_num", "capital_gain",
                                      "capital_loss", "hours_per_week", "workclass",
                                      "education", "marital_status", "occupation",
                                      "relationship", "race", "sex", "native_country"]]
    assert cols["age"] == ("double", False)  # median-imputed: optional, so double
    assert cols["workclass"] == ("string", False)  # category-imputed


def test_pyfunc_refuses_a_word_in_a_numeric_column(model: Registered) -> None:
    from mlflow.exceptions import MlflowException

    rows = raw_rows(model, 4).astype({"age": "object"})
    rows.loc[2, "age"] = "abc"
    with pytest.raises(MlflowException, match="column age"):
        load(model).predict(rows)


def test_absent_optional_column_is_a_column_of_nulls(model: Registered) -> None:
    m = load(model)
    rows = raw_rows(model)
    nulls = rows.assign(native_country=pd.Series([None] * len(rows), dtype="str"),
                        capital_gain=np.nan)
    absent = rows.drop(columns=["native_country", "capital_gain"])
    assert m.predict(absent).tolist() == m.predict(nulls).tolist()


def test_predict_is_typed_and_mlflow_gives_no_type_hint_advice(model: Registered) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load(model).predict(raw_rows(model, 3))
    assert not [w for w in seen if "type hint" in str(w.message)], [str(w.message) for w in seen]


def test_drop_rows_columns_are_required(tmp_path: Path) -> None:
    """Signature of a model whose numbers are imputed by drop_rows: those are required (and
    integer ones ``long``); the categoricals stay optional."""
    from tests.registered import adult_rows
    from trainer.config import DataSpec, ImputeSpec, ModelSpec, SplitSpec
    from trainer.models import new_model
    from trainer.pipeline import prepare, split_data
    from trainer.run import make_bundle
    from tuning.registry import model_signature

    data = DataSpec(path=str(adult_rows(tmp_path / "a.csv", 600)), columns=COLUMNS,
                    na_values=["?"], target="income", split=SplitSpec(val=0.2, test=0.2))
    impute = ImputeSpec(numeric="drop_rows", categorical="category")
    prepared = prepare(split_data(data), impute)
    model_spec = ModelSpec(kind="mlp", hidden=[4])
    net = new_model(model_spec, prepared, seed=0)
    bundle = make_bundle(model_spec, prepared, net)
    sig = model_signature(bundle, prepared.example)
    cols = {c.name: (c.type.name, c.required) for c in sig.inputs.inputs}
    assert cols["age"] == ("long", True) and cols["hours_per_week"] == ("long", True)
    assert cols["workclass"] == ("string", False)


# --- mlflow models serve ------------------------------------------------------------------


def _post(url: str, body: dict[str, Any]) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_mlflow_models_serve(model: Registered) -> None:
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on 127.0.0.1: a row
    with a missing value (and an absent optional column) is answered; "abc" for age is a
    400 that names the column."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = model.uri
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # uvicorn
    log = model.folder / "serve.log"
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen([mlflow_cli, "models", "serve", "-m",
                             f"models:/{model.name}@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)],
                            cwd=model.folder, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(base + "/ping", proc, log)
        row = {"age": 52, "workclass": None, "fnlwgt": 209642, "education": "HS-grad",
               "education_num": 9, "marital_status": "Married-civ-spouse",
               "occupation": "Exec-managerial", "relationship": "Husband", "race": "White",
               "sex": "Male", "capital_gain": None, "capital_loss": 0, "hours_per_week": 45}
        status, text = _post(base + "/invocations", {"dataframe_records": [row]})
        assert status == 200, text
        (answer,) = json.loads(text)["predictions"]
        assert answer["prediction"] in LABELS, text
        status, text = _post(base + "/invocations",
                             {"dataframe_records": [{**row, "age": "abc"}]})
        assert status == 400 and "column age" in text, text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer: {log.read_text()[-3000:]}")


# --- lineage ---------------------------------------------------------------------------------


def test_the_training_run_records_its_data(model: Registered) -> None:
    """MLflow's Dataset column: source, digest (= the data fingerprint), schema, rows."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=model.uri).get_run(model.run_id)
    (entry,) = run.inputs.dataset_inputs
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "training")]
    ds = entry.dataset
    assert ds.digest == run.data.tags["rungwise.data_fingerprint"]
    assert str(model.data) in ds.source and ds.name == model.data.name
    assert json.loads(ds.profile) == {"num_rows": 1400}  # 2,000 rows, 70% train
    cols = {c["name"]: c["type"] for c in json.loads(ds.schema)["mlflow_colspec"]}
    assert cols["age"] == "long" and cols["workclass"] == "string"
