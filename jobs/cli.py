"""The `rungwise` command line: inspect, train, tune, predict, retrain, schedule, submit, jobs.

Every user error is one line on stderr and exit code 2; ``--debug`` shows the traceback.
Heavy imports (torch, ray, mlflow) happen inside the commands that need them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from trainer.errors import RungwiseError, UserError

EXIT_USAGE = 2


__all__ = ["EXIT_USAGE", "RungwiseError", "UserError", "main"]


def _add_spec(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="path to the YAML job spec")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY.PATH=VALUE", help="override a spec value (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rungwise", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show the data, its missing values and the imputation plan")
    _add_spec(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="one training run of the spec's defaults, logged to MLflow")
    _add_spec(p)
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="a Ray Tune sweep tracked in MLflow; registers the best")
    _add_spec(p)
    p.add_argument("--resume", action="store_true", help="continue the last sweep of this spec")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    p.add_argument("--no-register", action="store_true", help="do not register the best model")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("predict", help="predict a CSV/Parquet with a registered model")
    _add_spec(p)
    p.add_argument("--input", required=True,
                   help="CSV (header row optional) or Parquet file of new rows; the target "
                        "column may be absent")
    p.add_argument("--output", default=None, help="where to write (default: stdout as CSV)")
    p.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    p.add_argument("--proba", action="store_true",
                   help="add a probability_<class> column per class (classification)")
    p.set_defaults(func=cmd_predict)

    _add_job_commands(sub)
    return parser


def _add_job_commands(sub: Any) -> None:
    """submit / jobs (jobs/commands.py), retrain / schedule (jobs/retrain_cli.py), drift
    (jobs/drift_cli.py)."""
    import importlib

    for name in ("jobs.commands", "jobs.retrain_cli", "jobs.drift_cli"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parsers(sub, _add_spec)


def _load(args: argparse.Namespace) -> Any:
    from jobs.spec import load_spec, parse_overrides

    return load_spec(args.spec, parse_overrides(args.overrides))


def cmd_inspect(args: argparse.Namespace) -> int:
    from jobs.inspect import inspect_spec

    print(inspect_spec(_load(args)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    spec = _load(args)  # a bad spec is reported before torch and MLflow are imported
    from jobs.train import train_command

    return train_command(spec, tracking=not args.no_tracking)


def cmd_tune(args: argparse.Namespace) -> int:
    from jobs.tune import tune_command

    return tune_command(_load(args), resume=args.resume, address=args.address,
                        register=not args.no_register, tracking=not args.no_tracking)


def cmd_predict(args: argparse.Namespace) -> int:
    from jobs.predict import predict_command

    return predict_command(_load(args), args.input, args.output, args.alias, proba=args.proba)


def _quiet() -> None:
    """MLflow and Ray are chatty; rungwise prints its own summary. --debug brings them back."""
    import logging
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("mlflow", "alembic", "ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug_flag = "--debug" in argv
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = args.debug or debug_flag
    func: Callable[[argparse.Namespace], int] = args.func
    debug = args.debug or os.environ.get("RUNGWISE_DEBUG") == "1"
    if not debug:
        _quiet()
    try:
        return func(args)
    except KeyboardInterrupt:
        print("rungwise: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not isinstance(exc, RungwiseError):
            if debug:
                raise
            print(f"rungwise: error: {type(exc).__name__}: {_one_line(exc)} "
                  "(run with --debug for the traceback)", file=sys.stderr)
            return 1
        print(f"rungwise: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


def _one_line(exc: BaseException) -> str:
    from tuning.secrets import mask_uri  # an error may quote a URI with its password

    text = mask_uri(" ".join(str(exc).split()))
    return text if len(text) <= 2000 else text[:1997] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
