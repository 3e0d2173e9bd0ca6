"""The layering (README "Layout"): ``trainer`` runs without Ray and MLflow and knows nothing of
``tuning`` or ``jobs``; ``tuning`` knows nothing of ``jobs``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"trainer": {"ray", "mlflow", "jobs", "tuning"}, "tuning": {"jobs"}}

IMPORT_ALL = """
import importlib, json, pkgutil, sys
for name in ("ray", "mlflow"):
    sys.modules[name] = None  # any `import ray...` now raises ImportError
import trainer
names = ["trainer"] + sorted(m.name for m in pkgutil.walk_packages(trainer.__path__, "trainer."))
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow", "jobs", "tuning")
                and sys.modules[m] is not None)
print(json.dumps({"imported": names, "leaked": leaked}))
"""


def modules_of(package: str) -> list[str]:
    """Dotted names of every module file under ``package`` (``__init__`` as the package)."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_every_trainer_module_imports_without_ray_and_mlflow() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(got["imported"]) == modules_of("trainer")  # pkgutil saw every file
    assert len(got["imported"]) >= 10
    assert got["leaked"] == []


def imported_roots(source: str) -> set[str]:
    """Top-level packages a module imports anywhere (functions included), including
    ``importlib.import_module("x")`` and ``__import__("x")`` with a literal name."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                roots.add(node.args[0].value.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {str(p.relative_to(ROOT)): sorted(imported_roots(p.read_text()) & FORBIDDEN[package])
           for p in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_import_scan_sees_every_form() -> None:
    source = """
import ray.tune
from mlflow.tracking import MlflowClient
def later():
    import jobs.spec
    importlib.import_module("tuning.sweep")
    __import__("optuna")
from . import sibling
from trainer.data import read_table
"""
    assert imported_roots(source) == {"ray", "mlflow", "jobs", "tuning", "optuna", "trainer"}


TRIAL_IMPORTS = """
import json, pickle, sys
import tuning.trainable
data = pickle.loads(open(sys.argv[1], "rb").read())
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"sklearn", "scipy", "mlflow"})
print(json.dumps({"type": type(data).__name__, "rows": len(data.x_train), "heavy": heavy}))
"""


def test_a_trial_worker_imports_neither_scikit_learn_nor_mlflow(tmp_path: Path) -> None:
    """What a sweep ships to its trials is arrays only: unpickling the fitted preprocessor
    made every trial worker import scikit-learn and SciPy (seconds of CPU per trial)."""
    import pickle

    from jobs.spec import load_spec
    from trainer.pipeline import split_data
    from tuning.sweep import prepare_variants

    spec = load_spec(ROOT / "tests" / "jobs" / "tiny_adult.yaml")
    prepared = next(iter(prepare_variants(spec, split_data(spec.data)).values()))
    assert type(prepared.preprocessor).__module__.startswith("trainer.")  # what stays home
    shipped = tmp_path / "shipped.pkl"
    shipped.write_bytes(pickle.dumps(prepared.arrays()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", TRIAL_IMPORTS, str(shipped)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"type": "ArrayData", "rows": len(prepared.x_train), "heavy": []}


# --- one error hierarchy (issue #13) ----------------------------------------------------------


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_imports_the_cli() -> None:
    """User errors live at the bottom (trainer/errors.py); the CLI is imported by no one."""
    allowed = {ROOT / "jobs" / "__main__.py", ROOT / "jobs" / "cli.py"}
    hits = [str(p.relative_to(ROOT)) for package in ("trainer", "tuning", "jobs")
            for p in sorted((ROOT / package).rglob("*.py"))
            if p not in allowed and "jobs.cli" in _imports(p)]
    assert hits == []


def test_every_error_class_is_a_rungwise_error() -> None:
    """Each exception class the packages define is a RungwiseError (exit 2, one line), so the
    CLI needs no list of them; `_`-prefixed ones are internal and never reach a person."""
    import importlib
    import inspect

    from trainer.errors import RungwiseError

    outside = []
    for package in ("trainer", "tuning", "jobs"):
        for name in modules_of(package):
            if name.endswith("__main__"):
                continue
            module = importlib.import_module(name)
            for attr, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseException)
                        and obj.__module__ == name and not attr.startswith("_")
                        and not issubclass(obj, RungwiseError)):
                    outside.append(f"{name}.{attr}")
    assert outside == []
