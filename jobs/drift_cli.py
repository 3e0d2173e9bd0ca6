"""The `drift` subcommand; ``jobs.cli.build_parser`` calls :func:`add_parsers`.

Building the parser imports nothing heavy; the handler imports jobs/drift.py when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

AddSpec = Callable[[argparse.ArgumentParser], None]


def add_parsers(sub: Any, add_spec: AddSpec) -> None:
    p = sub.add_parser(
        "drift", help="compare new rows with the data the registered model was trained on",
        description="Compare a CSV/Parquet file of new rows with the training profile that the "
                    "registered model carries: per column the population stability index, a "
                    "two-sample test (Kolmogorov-Smirnov for numbers, chi-square for "
                    "categories), the missing share then and now, categories never seen in "
                    "training and a verdict; the last line is `drift: a, b` or `no drift`. "
                    "Thresholds: schedule.drift. The report is logged to an MLflow run "
                    "(metrics drift.<column>.psi, artifacts drift/report.{txt,html,png}). "
                    "Exit 0; with --fail-on-drift, exit 3 when a column the model uses drifted.")
    add_spec(p)
    p.add_argument("--input", required=True, help="CSV (header row optional) or Parquet file")
    p.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    p.add_argument("--fail-on-drift", action="store_true",
                   help="exit 3 when any column the model uses drifted")
    p.set_defaults(func=cmd_drift)


def cmd_drift(args: argparse.Namespace) -> int:
    from jobs.drift import drift_command
    from jobs.spec import load_spec, parse_overrides

    spec = load_spec(args.spec, parse_overrides(args.overrides))
    return drift_command(spec, args.input, args.alias, args.fail_on_drift)
