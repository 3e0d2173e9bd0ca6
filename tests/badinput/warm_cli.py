"""Run many ``python -m jobs ...`` command lines fast: one warm interpreter, a fork each.

Starting Python and importing pydantic, pandas, pyarrow and scikit-learn costs 1-3 s of CPU
per command; the corpus has over a hundred. This script imports what ``rungwise inspect``
imports once, then forks a child per command line. Each child is its own process with its own
working directory, stdout, stderr and exit status, and runs ``jobs/__main__.py`` exactly as
``python -m jobs`` does (``runpy``), ending the way the interpreter ends: ``SystemExit`` gives
the exit status, any other exception prints its traceback and exits 1.

``test_corpus.py`` checks on a sample that this gives the same exit code and stderr as a
cold ``python -m jobs``. Protocol: a JSON list of ``{"id", "args", "cwd"}`` on stdin; a JSON
object ``{id: {"rc", "stdout", "stderr", "seconds"}}`` on stdout. ``argv[1]``: parallel
children (default 2).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet  # noqa: F401
import sklearn.model_selection  # noqa: F401

# What `rungwise inspect` imports anyway (nothing more: a module imported here and not by the
# real command could change what the command does).
import jobs.cli  # noqa: F401
import jobs.inspect  # noqa: F401
import jobs.spec  # noqa: F401
import trainer.pipeline  # noqa: F401


def _exit_code(code: Any) -> int:
    """What the interpreter makes of ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(args: list[str], cwd: str, out: Path, err: Path) -> None:
    """In the forked process: the command line, then ``os._exit`` with its status."""
    code = 1
    try:
        os.chdir(cwd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
        sys.argv = ["-m", *args]
        try:
            runpy.run_module("jobs", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_all(requests: list[dict[str, Any]], parallel: int) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    running: dict[int, tuple[dict[str, Any], Path, Path, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        queue = list(enumerate(requests))
        while queue or running:
            while queue and len(running) < parallel:
                i, req = queue.pop(0)
                out, err = Path(tmp) / f"{i}.out", Path(tmp) / f"{i}.err"
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(req["args"], req["cwd"], out, err)
                running[pid] = (req, out, err, time.perf_counter())
            pid, status = os.wait()
            req, out, err, t0 = running.pop(pid)
            results[req["id"]] = {
                "rc": os.waitstatus_to_exitcode(status),
                "stdout": out.read_text(errors="replace"),
                "stderr": err.read_text(errors="replace"),
                "seconds": time.perf_counter() - t0,
            }
    return results


def main() -> None:
    parallel = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    requests = json.load(sys.stdin)
    json.dump(run_all(requests, parallel), sys.stdout)


if __name__ == "__main__":
    main()
