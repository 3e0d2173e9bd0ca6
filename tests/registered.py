"""A small adult model, trained with `rungwise train` and registered as champion: shared by the
modules that test the registered model (tests/tuning/test_portable_model.py,
tests/jobs/test_predict.py). One epoch on 2,000 rows: about 20 s here."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADULT = ROOT / "examples" / "adult.yaml"
COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
           "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
           "hours_per_week", "native_country", "income"]
LABELS = {"<=50K", ">50K"}


@dataclass
class Registered:
    folder: Path
    uri: str
    name: str
    data: Path
    """the header-less training file (2,000 rows of adult, ``?`` for missing)"""
    sets: list[str]
    """``--set`` overrides that make examples/adult.yaml this model's spec"""
    run_id: str


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()
           if k not in ("RUNGWISE_DEBUG", "MLFLOW_TRACKING_URI")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    out["OMP_NUM_THREADS"] = "1"
    return out


def rungwise(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs", *map(str, args)], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def adult_rows(path: Path, n: int = 2000) -> Path:
    with gzip.open(ROOT / "data" / "adult" / "adult-train.csv.gz", "rt") as fh:
        lines = [next(fh) for _ in range(n)]
    path.write_text("".join(lines))
    return path


def train_and_register(folder: Path, name: str = "adult-portable",
                       extra: list[str] | None = None) -> Registered:
    """`rungwise train` (1 epoch, 2,000 rows), then the logged model registered as champion."""
    import mlflow

    from tests.conftest import sqlite_store
    from tuning import registry

    data = adult_rows(folder / "adult-2000.csv")
    uri = sqlite_store(folder)
    sets = [f"data.path={data}", "train.epochs=1", f"tracking.uri={uri}",
            f"tracking.register_as={name}", *(extra or [])]
    args: list[str] = ["train", str(ADULT)]
    for s in sets:
        args += ["--set", s]
    proc = rungwise(args, folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cl = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = cl.get_experiment_by_name("adult-income")
    (run,) = cl.search_runs([exp.experiment_id])
    (model,) = cl.search_logged_models([exp.experiment_id])
    version, aliases = registry.register(uri, f"models:/{model.model_id}", name,
                                         run.info.run_id)
    assert registry.CHAMPION in aliases
    return Registered(folder=folder, uri=uri, name=name, data=data, sets=sets,
                      run_id=run.info.run_id)
