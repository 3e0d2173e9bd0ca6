"""The `retrain` and `schedule` subcommands; ``jobs.cli.build_parser`` calls :func:`add_parsers`.

Kept apart from ``jobs/retrain.py`` and ``jobs/schedule.py`` so that building the parser
imports nothing heavy; the handlers import their modules when they run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

AddSpec = Callable[[argparse.ArgumentParser], None]


def add_parsers(sub: Any, add_spec: AddSpec) -> None:
    _add_retrain(sub, add_spec)
    _add_schedule(sub, add_spec)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_retrain(sub: Any, add_spec: AddSpec) -> None:
    p = sub.add_parser(
        "retrain", help="train a challenger on the current data; promote it if it beats the "
                        "champion",
        description="Re-read the data, run a warm-started sweep (schedule.retrain: sweep) or "
                    "refit the champion's configuration (refit), score champion and challenger "
                    "on the new data's test split, and move the champion alias only when the "
                    "challenger is better by schedule.promote_if_better_by. Exit code 0 whether "
                    "promoted or kept. One retrain per spec at a time, across machines: a "
                    "lease file in the storage (tune.storage / RUNGWISE_STORAGE) that "
                    "expires when its holder stops renewing it.")
    add_spec(p)
    p.add_argument("--wait", action="store_true",
                   help="wait for a running retrain of this spec instead of exiting with 2")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    p.set_defaults(func=cmd_retrain)


def _add_schedule(sub: Any, add_spec: AddSpec) -> None:
    p = sub.add_parser(
        "schedule", help="run `rungwise retrain` on the spec's schedule.cron",
        description="Loop in this process: sleep until the next time of schedule.cron (local "
                    "time), run `python -m jobs retrain SPEC` in a child process, log its exit "
                    "code, repeat. SIGTERM or Ctrl-C stop it.")
    add_spec(p)
    p.add_argument("--dry-run", action="store_true", help="print the next --count run times")
    p.add_argument("--count", type=_positive, default=5, help="times for --dry-run (default 5)")
    p.add_argument("--once-at", metavar="ISO_DATETIME", default=None,
                   help="print the next run time after this moment and exit")
    p.add_argument("--max-runs", type=_positive, default=None, help="stop after N retrains")
    p.set_defaults(func=cmd_schedule)


def _load(args: argparse.Namespace) -> Any:
    from jobs.spec import load_spec, parse_overrides

    return load_spec(args.spec, parse_overrides(args.overrides))


def cmd_retrain(args: argparse.Namespace) -> int:
    from jobs.retrain import retrain_command

    return retrain_command(_load(args), wait=args.wait, address=args.address)


def cmd_schedule(args: argparse.Namespace) -> int:
    from jobs.schedule import schedule_command

    return schedule_command(_load(args), args.spec, args.overrides, dry_run=args.dry_run,
                            count=args.count, once_at=args.once_at, max_runs=args.max_runs)
