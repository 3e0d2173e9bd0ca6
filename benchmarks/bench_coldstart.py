"""Cold start: from invoking `rungwise tune` to the first trial's first reported epoch.

The job: examples/adult.yaml with ``--set tune.num_samples=1 --set train.epochs=1`` (the
spec's own space, so the sweep prepares one dataset per ``impute.numeric`` choice, as the
CLI does), a fresh SQLite MLflow store in a temporary working directory, registration on.

Measured, each in fresh processes:

1. ``python_startup_s``: ``python -c pass`` with the project's interpreter (best of 3).
2. ``imports``: in a fresh interpreter, cumulative, in this order: jobs.cli, torch,
   ray + ray.tune, mlflow, tuning.sweep (what is left: trainer, pandas, sklearn, optuna ...).
   ``importtime_top``: ``python -X importtime`` of the same, self time summed per top-level
   package (the biggest first).
3. ``phases``: a fresh interpreter (this script with ``--child``) times the imports again,
   then mirrors the CLI: load_spec; MLflow store creation on the fresh SQLite file
   (``mlflow_db_create_s``: engine + Alembic migrations, measured apart); then the real
   ``run_sweep`` with its phases timed from outside (benchmarks/common.py ``instrument``):
   read + split, ray.init, prepare (every imputation variant), object-store puts, MLflow
   parent run (on the now-migrated store), Tuner.fit start to the first reported epoch (of
   which ``first_epoch_s`` is the epoch itself), and what follows (evaluate, log the model,
   register). ``to_first_epoch_s`` = python start-up + everything up to the first result.
4. ``cli``: ``python -m jobs tune`` end to end; stdout lines are time-stamped on arrival:
   the first line (imports + spec load), ``trial ... started``, the first result (the
   status line or ``ended at epoch 1``), and exit.

Target: none set by the issue; ``cli.to_first_epoch_s`` is the headline number.

Usage: python benchmarks/bench_coldstart.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import ADULT, check, r, say  # noqa: E402

PY = sys.executable
OVERRIDES = {"tune.num_samples": 1, "train.epochs": 1}
IMPORTS = [("jobs_cli", "import jobs.cli"), ("torch", "import torch"),
           ("ray_tune", "import ray; from ray import tune"), ("mlflow", "import mlflow"),
           ("tuning_sweep", "import tuning.sweep")]
IMPORT_SNIPPET = (
    "import json, time\n"
    "t, c = time.perf_counter(), time.process_time(); out, cpu = {}, {}\n"
    + "".join(f"{stmt}\nout[{name!r}] = time.perf_counter() - t\n"
              f"cpu[{name!r}] = time.process_time() - c\n"
              "t, c = time.perf_counter(), time.process_time()\n"
              for name, stmt in IMPORTS)
    + "print(json.dumps([out, cpu]))\n")


def child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(common.QUIET_ENV)
    env.update({"RUNGWISE_STORAGE": str(tmp / "runs"), "PYTHONUNBUFFERED": "1"})
    return env


def python_startup(n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def imports(tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = subprocess.run([PY, "-c", IMPORT_SNIPPET], check=True, capture_output=True,
                         text=True, cwd=tmp, env=child_env(tmp))
    wall = time.perf_counter() - t0
    times, cpu = json.loads(out.stdout.strip().splitlines()[-1])
    return {**{f"{k}_s": r(v) for k, v in times.items()}, "total_s": r(sum(times.values())),
            "total_cpu_s": r(sum(cpu.values())), "cpu": {f"{k}_s": r(v) for k, v in cpu.items()},
            "process_wall_s": r(wall)}


def importtime_top(tmp: Path, top: int = 8) -> dict[str, float]:
    stmts = "; ".join(stmt for _, stmt in IMPORTS)
    out = subprocess.run([PY, "-X", "importtime", "-c", stmts], check=True,
                         capture_output=True, text=True, cwd=tmp, env=child_env(tmp))
    by: dict[str, float] = defaultdict(float)
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s*\|\s*(\d+)\s*\|\s*(\S.*)$", line)
        if m:
            by[m.group(3).strip().split(".")[0]] += int(m.group(1)) / 1e6
    ranked = sorted(by.items(), key=lambda kv: -kv[1])
    out_top = {k: r(v) for k, v in ranked[:top]}
    out_top["(all)"] = r(sum(by.values()))
    return out_top


# --- the phases, in a fresh interpreter ----------------------------------------------------


def child(tmp: Path) -> None:
    """Run in a fresh interpreter by ``phases``; prints one JSON line."""
    t_start = time.perf_counter()
    common.json_stdout()
    ph: dict[str, float] = {}
    t, c0 = time.perf_counter(), time.process_time()
    for name, stmt in IMPORTS:
        exec(stmt, {})  # noqa: S102 - fixed import statements
        ph[f"import_{name}"] = time.perf_counter() - t
        t = time.perf_counter()
    ph["imports_cpu"] = time.process_time() - c0
    common.quiet()
    os.chdir(tmp)
    from jobs.spec import load_spec
    from tuning.tracking import client, resolve_tracking_uri

    t = time.perf_counter()
    spec = load_spec(ADULT, overrides=OVERRIDES)
    ph["spec_load"] = time.perf_counter() - t
    uri = resolve_tracking_uri(spec.tracking.uri)  # sqlite:///<tmp>/mlflow.db, absolute
    t, c = time.perf_counter(), time.process_time()
    client(uri).search_experiments(max_results=1)
    ph["mlflow_db_create"] = time.perf_counter() - t
    ph["mlflow_db_create_cpu"] = time.process_time() - c
    variants = len(__import__("tuning.space", fromlist=["x"]).impute_variants(spec) or [])
    t_sweep = time.perf_counter()
    _, wall, probe = common.timed_sweep(spec)
    stats = probe.trial_stats(1)
    first = probe.marks.get("first_result")
    fit_start = probe.marks.get("tuner_fit_start")
    first_epoch = next((float(res.get("epoch_time_s") or 0) for _, _, res in probe.results),
                       None)
    out: dict[str, Any] = {f"{k}_s": r(v) for k, v in ph.items()}
    sweep_ph = common.phases(probe, wall)
    pre_fit = (fit_start - t_sweep) if fit_start else None
    out.update({
        "imputation_variants": variants,
        "run_sweep": sweep_ph,
        "run_sweep_to_fit_start_s": r(pre_fit),
        "fit_start_to_first_trial_start_s": stats.get("fit_start_to_first_trial_start_s"),
        "fit_start_to_first_result_s": stats.get("fit_start_to_first_result_s"),
        "first_epoch_s": r(first_epoch),
        "after_first_result_s": r(t_sweep + wall - first) if first else None,
        "process_to_first_result_s": r(first - t_start) if first else None,
        "run_sweep_wall_s": r(wall),
    })
    common.emit(out)


def phases(tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([PY, str(Path(__file__).resolve()), "--child", str(tmp)],
                          capture_output=True, text=True, cwd=tmp, env=child_env(tmp))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"phases child failed with exit code {proc.returncode}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = r(wall)
    return out


# --- the CLI, end to end -------------------------------------------------------------------


FIRST_RESULT = re.compile(r"best \w+=|ended at epoch|FAILED")


def cli(tmp: Path) -> dict[str, Any]:
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]
    cmd = [PY, "-m", "jobs", "tune", str(ADULT), *sets]
    marks: dict[str, float] = {}
    lines: list[str] = []
    err_path = tmp / "cli.stderr"
    with open(err_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=child_env(tmp), stdout=subprocess.PIPE,
                                stderr=err, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - t0
            lines.append(line.rstrip())
            marks.setdefault("first_line", now)
            if " started:" in line:
                marks.setdefault("trial_started", now)
            if FIRST_RESULT.search(line):
                marks.setdefault("first_result", now)
        rc = proc.wait()
        marks["exit"] = time.perf_counter() - t0
    if rc != 0:
        sys.stderr.write("\n".join(lines[-20:]) + "\n" + err_path.read_text()[-4000:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {rc}")
    elapsed = [int(m.group(1)) for ln in lines if (m := re.match(r"\[\s*(\d+)s\]", ln))]
    return {"command": " ".join(["python", "-m", "jobs", "tune", "examples/adult.yaml",
                                 *sets]),
            "to_first_line_s": r(marks.get("first_line")),
            "to_trial_started_s": r(marks.get("trial_started")),
            "to_first_epoch_s": r(marks.get("first_result")),
            "to_exit_s": r(marks["exit"]),
            "progress_clock_at_first_epoch_s": elapsed[0] if elapsed else None,
            "mlflow_db_created": (tmp / "mlflow.db").is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one python start-up sample, no -X importtime breakdown")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child))
        return
    common.json_stdout()
    out: dict[str, Any] = {"bench": "coldstart", "quick": args.quick,
                           "job": f"examples/adult.yaml + {OVERRIDES}"}
    with tempfile.TemporaryDirectory(prefix="rungwise-bench-cold-") as d:
        base = Path(d)
        for part in ("imports", "phases", "cli"):
            (base / part).mkdir()
        say("1/4 python start-up")
        out["python_startup_s"] = r(python_startup(1 if args.quick else 3))
        say("2/4 imports in a fresh interpreter")
        out["imports"] = imports(base / "imports")
        if not args.quick:
            out["importtime_top"] = importtime_top(base / "imports")
        say("3/4 phases of `rungwise tune` in a fresh interpreter")
        ph = phases(base / "phases")
        ph["to_first_epoch_s"] = r(out["python_startup_s"] + ph["process_to_first_result_s"])
        out["phases"] = ph
        say(f"phases: first epoch {ph['to_first_epoch_s']} s after python start")
        say("4/4 `python -m jobs tune` end to end")
        out["cli"] = cli(base / "cli")
        say(f"cli: first epoch at {out['cli']['to_first_epoch_s']} s, exit at "
            f"{out['cli']['to_exit_s']} s")
    sw = out["phases"]["run_sweep"]
    out["checks"] = [
        check("coldstart.cli_to_first_epoch_s", out["cli"]["to_first_epoch_s"]),
        check("coldstart.imports_s", out["imports"]["total_s"]),
        check("coldstart.imports_cpu_s", out["imports"]["total_cpu_s"]),
        check("coldstart.ray_init_s", sw.get("ray_init_s")),
        check("coldstart.mlflow_db_create_s", out["phases"]["mlflow_db_create_s"]),
        check("coldstart.tuner_fit_to_first_epoch_s",
              out["phases"]["fit_start_to_first_result_s"]),
    ]
    common.emit(out)


if __name__ == "__main__":
    main()
