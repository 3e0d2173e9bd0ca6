"""Run every benchmark, one after the other, each in its own process.

Each script prints one JSON line on stdout (its progress goes to stderr, shown live). The
lines are collected into benchmarks/results.json (``--quick``: results-quick.json) with the
machine's description (CPU count and model, load average before and after, torch / ray /
mlflow versions, date), and a markdown table (bench, metric, value, target, met?) is
printed on stdout.

``--quick`` passes ``--quick`` to the scripts that accept it (bench_sweep, bench_search,
bench_pack_sweep, bench_coldstart, bench_gpu) and runs the others (bench_impute, bench_trainer,
bench_pack) as they are; the whole
quick run is meant to finish in under 10 minutes on 2 idle cores.

Timings are only comparable on a quiet machine: the load average is recorded so that a noisy
run can be recognised. Exit code: 0 when every script ran (targets met or not), 1 otherwise.

Usage: python benchmarks/run_all.py [--quick] [--only sweep search] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import check, machine_info  # noqa: E402

SCRIPTS = ["bench_impute.py", "bench_trainer.py", "bench_sweep.py", "bench_search.py",
           "bench_pack.py", "bench_pack_sweep.py",
           "bench_coldstart.py", "bench_gpu.py"]

# Targets of the scripts that do not print their own ``checks`` (from their docstrings);
# op None = reported without a target.
EXTERNAL: dict[str, list[tuple[str, str | None, float | None]]] = {
    "impute": [("ratio", None, None), ("peak_mem_ratio", None, None)],
    "trainer": [("trainer_vs_handwritten", "<=", 1.10), ("dataloader_vs_trainer", ">=", 5.0)],
}


def supports_quick(script: Path) -> bool:
    return '"--quick"' in script.read_text()


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def run(script: Path, quick: bool, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(script)] + (["--quick"] if quick and supports_quick(script)
                                            else [])
    print(f"\n=== {' '.join(Path(c).name if i else c for i, c in enumerate(cmd))}",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True,
                              timeout=timeout, cwd=HERE.parent)
        rc, stdout = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        rc = -1
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    wall = time.perf_counter() - t0
    result = last_json(stdout) or {}
    result.setdefault("bench", script.stem.removeprefix("bench_"))
    meta = {"script": script.name, "argv": cmd[2:], "returncode": rc,
            "script_wall_s": round(wall, 1)}
    if rc != 0 or "checks" not in result and result["bench"] not in EXTERNAL:
        meta["error"] = ("timed out" if rc == -1 else f"exit code {rc}") if rc != 0 else \
            "no JSON line on stdout"
    print(f"=== {script.name}: exit {rc} in {wall:.0f} s", file=sys.stderr, flush=True)
    return {**result, "_run": meta}


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    if "checks" in result:
        return list(result["checks"])
    out = []
    for key, op, target in EXTERNAL.get(result["bench"], []):
        value = result.get(key)
        out.append(check(f"{result['bench']}.{key}", value, op, target))
    return out


def table(results: list[dict[str, Any]], machine: dict[str, Any], quick: bool) -> str:
    lines = [f"Benchmarks{' (quick)' if quick else ''}: {machine['cpu_count']} x "
             f"{machine['cpu_model']}, load average {machine['loadavg']} at start, "
             f"torch {machine['torch']}, ray {machine['ray']}, mlflow {machine['mlflow']}, "
             f"{machine['date']}", "",
             "| metric | value | target | met? |", "|---|---:|---|---|"]
    for result in results:
        meta = result["_run"]
        if meta.get("error"):
            lines.append(f"| {meta['script']} | {meta['error']} | - | no |")
        for row in rows(result):
            met = {True: "yes", False: "no", None: "-"}[row["met"]]
            value = "n/a" if row["value"] is None else f"{row['value']:g}"
            lines.append(f"| {row['metric']} | {value} | {row['target']} | {met} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", default=None,
                        help="a subset, by name: impute trainer sweep search coldstart gpu")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per script (default 600, quick 300)")
    parser.add_argument("--out", default=None,
                        help="default benchmarks/results.json (quick: results-quick.json, so "
                             "a quick run never replaces the full figures the README cites)")
    args = parser.parse_args()
    timeout = args.timeout or (300 if args.quick else 3600)
    args.out = args.out or str(HERE / ("results-quick.json" if args.quick else "results.json"))
    scripts = [HERE / s for s in SCRIPTS
               if args.only is None or s.removeprefix("bench_").removesuffix(".py") in args.only]
    machine = machine_info()
    t0 = time.perf_counter()
    results = [run(s, args.quick, timeout) for s in scripts]
    machine["loadavg_end"] = machine_info()["loadavg"]
    doc = {"quick": args.quick, "machine": machine,
           "total_wall_s": round(time.perf_counter() - t0, 1), "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(table(results, machine, args.quick))
    print(f"\n{len(results)} scripts in {doc['total_wall_s']:.0f} s; results: {args.out}",
          file=sys.stderr)
    return 1 if any(res["_run"].get("error") for res in results) else 0


if __name__ == "__main__":
    sys.exit(main())
