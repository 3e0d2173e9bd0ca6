"""The bad-input corpus through the real command line: one line on stderr, exit code 2.

Every spec in ``specs/`` and every data file in ``data/`` runs as ``python -m jobs inspect
SPEC`` in its own process (``inspect`` needs neither Ray nor MLflow). Each must exit with
code 2 and print exactly one line, ``rungwise: error: ...``, naming what is wrong (the
``# expect:`` line of a spec, ``DATA_CASES`` for a data file), without a traceback;
``--debug`` brings the traceback back. A few run as ``train`` against a fresh SQLite store,
which must stay empty: specs and data are checked before MLflow is touched.

Over a hundred cold interpreters cost minutes of CPU, so the corpus runs through
``warm_cli.py``: one interpreter that has imported what ``inspect`` imports forks a process
per command line. ``test_warm_runner_matches_the_real_cli`` runs a sample both ways and
requires the same exit code and stderr; the ``--debug`` and ``train`` cases always run cold.

The generated files come from ``make_corpus.py``; ``test_generator_reproduces_corpus``
keeps the two in step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SPECS = HERE / "specs"
DATA = HERE / "data"
GOOD = HERE / "good"
WORKERS = max(2, os.cpu_count() or 2)
TIMEOUT_S = 180

# Specs that cannot carry an "# expect:" line.
EXPECT_WITHOUT_COMMENT = {"empty.yaml": "a job spec is a mapping of sections, got NoneType"}

# data file -> (extra keys of the spec's data section, what the one-line error must say)
DATA_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "a_directory.csv": ({}, "a_directory.csv is a directory"),
    "corrupt.csv.gz": ({}, "data.path: cannot read"),
    "empty.csv": ({}, "empty.csv is empty"),
    "empty.parquet": ({}, "data.path: cannot read"),
    "flat_x.npz": ({}, "data.path: x must be (N, H, W) or (N, C, H, W)"),
    "header_only.csv": ({}, "header_only.csv has no rows"),
    "huge_categorical.csv.gz": ({}, "data.categorical: column 'customer' has 1,200 distinct"),
    "infinite_target_regression.csv": ({"task": "regression"},
                                       "data.target: 'y' has infinite values"),
    "latin1.csv": ({}, "is not UTF-8 text"),
    "nan_pixels.npz": ({}, "has missing or infinite pixels"),
    "nested_list.parquet": ({}, "data.path: column 'tags' of"),
    "nested_struct.parquet": ({}, "data.path: column 'where' of"),
    "no_xy.npz": ({}, "must hold arrays 'x' and 'y', has images, labels"),
    "not_npz.npz": ({}, "not_npz.npz is not an .npz file"),
    "not_parquet.parquet": ({}, "data.path: cannot read"),
    "object_array.npz": ({}, "Object arrays cannot be loaded when allow_pickle=False"),
    "only_target.csv": ({}, "data.features: no feature columns"),
    "ragged.csv": ({}, "data.path: cannot read"),
    "semicolon.csv": ({}, "check data.delimiter"),
    "single_class.csv": ({}, "data.target: 'y' has a single class ('yes')"),
    "single_class.npz": ({}, "y holds a single class"),
    "target_all_missing.csv": ({}, "data.target: 'y' is missing in every row"),
    "target_all_na_values.csv": ({"na_values": ["?"]}, "data.target: 'y' is missing in every row"),
    "target_some_missing.csv": ({}, "data.target: 'y' has 2 missing values"),
    "text_target_regression.csv": ({"task": "regression"}, "data.target: 'y' is not numeric"),
    "too_few_rows.csv": ({}, "data.split: 3 rows are too few"),
    "utf16.csv": ({}, "data.path: cannot read"),
}

# Run as `train` too (cold), against a fresh SQLite store that must get no run.
TRAIN_SPECS = ("tracking_artifact_location.yaml", "yaml_bomb.yaml")
TRAIN_DATA = ("target_all_missing.csv", "nested_list.parquet")
# Run with --debug (cold): the traceback is shown.
DEBUG_SPECS = ("model_hiden.yaml", "yaml_bomb.yaml")
DEBUG_DATA = ("semicolon.csv", "nested_list.parquet")
# Run cold as well as warm: both must give the same exit code and stderr.
PARITY = ("spec/model_hiden.yaml", "spec/yaml_python_object.yaml", "spec/empty.yaml",
          "spec/latin1_spec.yaml", "spec/tune_space_loguniform_zero.yaml",
          "data/latin1.csv", "data/nested_list.parquet", "data/huge_categorical.csv.gz",
          "data/no_xy.npz")


@dataclass(frozen=True)
class Case:
    """One command line to run and what its one-line error must contain."""

    id: str
    spec: Path
    expect: str
    command: str = "inspect"
    debug: bool = False


@dataclass(frozen=True)
class Outcome:
    rc: int
    stdout: str
    stderr: str
    seconds: float


def spec_files() -> list[Path]:
    return sorted(SPECS.glob("*.yaml"))


def data_files() -> list[Path]:
    return sorted(p for p in DATA.iterdir() if not p.name.startswith("."))


def expectation(spec: Path) -> str:
    first = spec.read_bytes().split(b"\n", 1)[0].decode("ascii", errors="replace")
    if first.startswith("# expect:"):
        return first.removeprefix("# expect:").strip()
    return EXPECT_WITHOUT_COMMENT[spec.name]


def write_data_spec(folder: Path, data_file: Path, extra: dict[str, Any]) -> Path:
    """A spec that is valid in itself and names ``data_file`` (absolute path)."""
    spec = {"name": f"bad-data-{data_file.stem.replace('.', '-')}",
            "data": {"path": str(data_file), "target": "y", **extra},
            "train": {"epochs": 1, "batch_size": 64}}
    path = folder / f"{data_file.name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RUNGWISE_DEBUG", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Outcome:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd,
                          env=env or cli_env(), capture_output=True, text=True,
                          errors="replace", timeout=TIMEOUT_S, check=False)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


def case_args(case: Case, store: Path | None = None) -> list[str]:
    args = ["--debug"] if case.debug else []
    args += [case.command, str(case.spec)]
    if store is not None:
        args += ["--set", f"tracking.uri=sqlite:///{store}"]
    return args


def all_cases(data_spec_dir: Path) -> list[Case]:
    cases = [Case(f"spec/{p.name}", p, expectation(p)) for p in spec_files()]
    for name, (extra, expect) in DATA_CASES.items():
        spec = write_data_spec(data_spec_dir, DATA / name, extra)
        cases.append(Case(f"data/{name}", spec, expect))
    return cases


# --- the corpus is complete and tiny -------------------------------------------------------


def test_corpus_size_and_bookkeeping() -> None:
    specs, data = spec_files(), data_files()
    assert len(specs) >= 40, f"{len(specs)} bad specs"
    assert len(data) >= 20, f"{len(data)} bad data files"
    assert {p.name for p in data} == set(DATA_CASES), "DATA_CASES and data/ differ"
    for spec in specs:
        assert expectation(spec), spec.name
    for path in [*specs, *data, *GOOD.iterdir()]:
        size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() \
            else path.stat().st_size
        assert size < 16_000, f"{path.name} is {size} bytes: keep the corpus tiny"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_corpus", HERE / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_corpus(tmp_path: Path) -> None:
    """make_corpus.py writes exactly the committed generated files (Parquet: same table)."""
    import pyarrow.parquet as pq

    written = _load_generator().write_all(tmp_path)
    assert len(written) >= 20
    for path in written:
        committed = HERE / path.relative_to(tmp_path)
        assert committed.exists(), f"run make_corpus.py: {committed.name} is not committed"
        if path.is_dir():
            continue
        if path.read_bytes() != committed.read_bytes():  # a pyarrow upgrade may re-encode
            assert path.suffix == ".parquet", f"{path.name} differs from make_corpus.py's"
            assert pq.read_table(path).equals(pq.read_table(committed)), path.name


# --- every case through the real CLI, in parallel --------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of every command: nothing may appear in it."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return {c.id: c for c in all_cases(tmp_path_factory.mktemp("data-specs"))}


def run_cold(todo: list[Case], cwd: Path, env: dict[str, str] | None = None,
             store: Path | None = None) -> dict[str, Outcome]:
    """Each case as ``python -m jobs ...`` from scratch, ``WORKERS`` at a time."""
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        outs = pool.map(lambda c: run_cli(case_args(c, store), cwd, env), todo)
        return dict(zip([c.id for c in todo], outs, strict=True))


def run_warm(todo: list[Case], cwd: Path) -> dict[str, Outcome]:
    """Each case in a process forked from one warm interpreter (see warm_cli.py)."""
    requests = [{"id": c.id, "args": case_args(c), "cwd": str(cwd)} for c in todo]
    proc = subprocess.run([sys.executable, str(HERE / "warm_cli.py"), str(WORKERS)],
                          input=json.dumps(requests), capture_output=True, text=True,
                          env=cli_env(), cwd=cwd, timeout=TIMEOUT_S * 4, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k: Outcome(**v) for k, v in json.loads(proc.stdout).items()}


@pytest.fixture(scope="module")
def outcomes(cases: dict[str, Case], workdir: Path) -> Iterator[dict[str, Outcome]]:
    """Run every case once; the tests then read the results."""
    t0 = time.perf_counter()
    runner = run_warm if hasattr(os, "fork") else run_cold
    results = runner(list(cases.values()), workdir)
    slowest = max(results.items(), key=lambda kv: kv[1].seconds)
    print(f"\ncorpus: {len(cases)} commands ({runner.__name__}, {WORKERS} at a time) in "
          f"{time.perf_counter() - t0:.1f} s; slowest {slowest[0]} {slowest[1].seconds:.1f} s")
    yield results


CASE_IDS = [f"spec/{p.name}" for p in spec_files()] + [f"data/{n}" for n in DATA_CASES]


def assert_one_line_error(out: Outcome, expect: str) -> None:
    assert out.rc == 2, f"exit {out.rc}; stderr: {out.stderr[-2000:]}"
    lines = out.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{out.stderr[-3000:]}"
    assert lines[0].startswith("rungwise: error: "), lines[0]
    assert "Traceback" not in out.stderr
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    assert out.stdout == "", out.stdout[-500:]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_inspect_refuses_with_one_line(outcomes: dict[str, Outcome], case_id: str) -> None:
    out = outcomes[case_id]
    if case_id.startswith("spec/"):
        expect = expectation(SPECS / case_id.removeprefix("spec/"))
    else:
        expect = DATA_CASES[case_id.removeprefix("data/")][1]
    assert_one_line_error(out, expect)


def test_warm_runner_matches_the_real_cli(outcomes: dict[str, Outcome],
                                         cases: dict[str, Case], workdir: Path) -> None:
    cold = run_cold([cases[i] for i in PARITY], workdir)
    for case_id, out in cold.items():
        warm = outcomes[case_id]
        assert (warm.rc, warm.stderr, warm.stdout) == (out.rc, out.stderr, out.stdout), case_id


def test_nothing_was_executed_or_written(outcomes: dict[str, Outcome], workdir: Path) -> None:
    """yaml_python_object.yaml asks os.system to touch a file in the working directory."""
    assert "spec/yaml_python_object.yaml" in outcomes
    assert sorted(p.name for p in workdir.iterdir()) == []


def test_good_spec_passes(workdir: Path, tmp_path: Path) -> None:
    """The control: the spec the bad ones are variations of is fine."""
    spec = tmp_path / "ok.yaml"
    spec.write_text(f"name: good\ndata: {{path: {GOOD / 'ok.csv'}, target: y}}\n")
    out = run_cli(["inspect", str(spec)], workdir)
    assert out.rc == 0, out.stderr
    assert "rows train/val/test: 28/6/6" in out.stdout
    assert "classes (train): no=50.0%, yes=50.0%" in out.stdout


def test_all_missing_column_is_dropped_with_a_warning(workdir: Path, tmp_path: Path) -> None:
    """Valid with a warning, not an error: a column with no value at all is dropped."""
    spec = write_data_spec(tmp_path, GOOD / "all_missing_column.csv", {})
    out = run_cli(["inspect", str(spec)], workdir)
    assert out.rc == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("empty "))
    assert "100.0%" in row and "drop column (no observed value)" in row
    assert "1 column(s) will be dropped" in out.stdout
    assert "dropping column(s) with no observed value in training: empty" in out.stderr


def test_spec_over_one_megabyte_is_refused(workdir: Path, tmp_path: Path) -> None:
    spec = tmp_path / "huge.yaml"
    filler = "# " + "x" * 98 + "\n"
    spec.write_text(f"name: huge\ndata: {{path: {GOOD / 'ok.csv'}}}\n" + filler * 10_500)
    assert spec.stat().st_size > 1_000_000
    assert_one_line_error(run_cli(["inspect", str(spec)], workdir),
                          "bytes; the limit is 1,000,000")


def _debug_cases(tmp_path: Path) -> list[Case]:
    cases = [Case(f"spec/{n}", SPECS / n, expectation(SPECS / n), debug=True)
             for n in DEBUG_SPECS]
    for name in DEBUG_DATA:
        extra, expect = DATA_CASES[name]
        cases.append(Case(f"data/{name}", write_data_spec(tmp_path, DATA / name, extra),
                          expect, debug=True))
    return cases


def test_debug_shows_the_traceback(workdir: Path, tmp_path: Path) -> None:
    cases = _debug_cases(tmp_path)
    outs = run_cold(cases, workdir).values()
    for case, out in zip(cases, outs, strict=True):
        assert out.rc != 0, case.id
        assert "Traceback (most recent call last)" in out.stderr, (case.id, out.stderr[-1000:])
        last = out.stderr.strip().splitlines()[-1]
        assert case.expect in last, (case.id, last)
        assert last.split(":")[0].endswith(("SpecError", "DataError")), (case.id, last)
    # RUNGWISE_DEBUG=1 does the same as --debug
    env_case = Case("env", SPECS / "model_hiden.yaml", "model.hiden")
    out = run_cli(case_args(env_case), workdir, cli_env(RUNGWISE_DEBUG="1"))
    assert "Traceback (most recent call last)" in out.stderr


def _runs_in(store: Path) -> int:
    """Runs in a SQLite MLflow store (0 when the file was never created)."""
    if not store.exists():
        return 0
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exps = [e.experiment_id for e in cl.search_experiments()]
    return len(cl.search_runs(exps)) if exps else 0


@pytest.mark.slow
def test_train_refuses_before_touching_mlflow(tmp_path: Path) -> None:
    """`train` fails on spec and data errors without a run (or even a store) in MLflow."""
    cases = [Case(f"spec/{n}", SPECS / n, expectation(SPECS / n), command="train")
             for n in TRAIN_SPECS]
    for name in TRAIN_DATA:
        extra, expect = DATA_CASES[name]
        cases.append(Case(f"data/{name}", write_data_spec(tmp_path, DATA / name, extra),
                          expect, command="train"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    set_store, env_store = tmp_path / "set.db", tmp_path / "env.db"
    env = cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{env_store}")
    outs = run_cold(cases, cwd, env, set_store).values()
    for case, out in zip(cases, outs, strict=True):
        assert_one_line_error(out, case.expect)
    for store in (set_store, env_store, cwd / "mlflow.db"):
        assert _runs_in(store) == 0, store
    assert not (cwd / "mlruns").exists() and not (cwd / "mlartifacts").exists()
