"""The cluster subcommands: ``submit`` (a spec as a Ray job) and ``jobs`` (list/status/logs/stop).

``jobs.cli.build_parser`` calls :func:`add_parsers`; each ``_add_*`` registers one subcommand
and its handler. Handlers import their heavy modules (ray) when they run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.cluster import Cluster

AddSpec = Callable[[argparse.ArgumentParser], None]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_parsers(sub: Any, add_spec: AddSpec) -> None:
    """Register the extra subcommands on the CLI's subparsers."""
    _add_submit(sub, add_spec)
    _add_jobs(sub)


# --- submit ----------------------------------------------------------------------------


def _add_submit(sub: Any, add_spec: AddSpec) -> None:
    from jobs.submit import COMMANDS, HIDDEN_COMMANDS

    p = sub.add_parser(
        "submit", help="run the spec on a Ray cluster as a Ray job",
        description="Upload the project folder as the job's working_dir and run "
                    "`python -m jobs COMMAND SPEC` on the cluster. The head must run in the "
                    "environment that has rungwise's dependencies (or pass --python). With "
                    "token authentication, the token is read from RAY_AUTH_TOKEN, "
                    "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.")
    add_spec(p)
    _add_address(p)
    p.add_argument("--command", default="tune", choices=COMMANDS + HIDDEN_COMMANDS,
                   metavar="{" + ",".join(COMMANDS) + "}",
                   help="what the job runs (default: tune)")
    p.add_argument("--follow", action="store_true",
                   help="stream the job's logs until it ends; exit 0 if it succeeded, else 1")
    p.add_argument("--no-wait", action="store_true",
                   help="return right after submitting (default: wait until the job starts)")
    p.add_argument("--allow-local-tracking", action="store_true",
                   help="submit even if MLflow tracking points at a local file or SQLite store")
    p.add_argument("--python", default="python",
                   help="interpreter on the cluster (default: `python` on the head's PATH)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="extra package for the job's runtime_env pip (repeatable)")
    p.add_argument("--arg", dest="extra_args", action="append", default=[], metavar="ARG",
                   help="extra argument for the command on the cluster, e.g. "
                        "--arg=--no-register (repeatable)")
    p.add_argument("--working-dir", default=None, metavar="FOLDER",
                   help="the folder to upload, holding the spec (default: the project folder, "
                        "the nearest above the spec with pyproject.toml; none is refused)")
    p.add_argument("--dry-run", action="store_true",
                   help="print every file that would be uploaded and the total size, then exit "
                        "without contacting the cluster")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submit import SubmitRequest, dry_run, submit

    req = SubmitRequest(
        spec=args.spec, overrides=list(args.overrides), address=args.address,
        command=args.command, python=args.python, pip=list(args.pip), args=list(args.extra_args),
        allow_local_tracking=args.allow_local_tracking, working_dir=args.working_dir,
        dry_run=args.dry_run, insecure=args.insecure, debug=args.debug)
    if req.dry_run:
        return dry_run(req)
    cluster, job_id = submit(req)
    if args.follow:
        return follow(cluster, job_id)
    return 0 if args.no_wait else wait_started(cluster, job_id)


def wait_started(cluster: Cluster, job_id: str) -> int:
    """Wait while the runtime env is set up; a job that fails there exits 1 with its reason."""
    with cluster.errors(job_id):
        info = cluster.client.get_job_info(job_id)
        while str(info.status) == "PENDING":
            time.sleep(1.0)
            info = cluster.client.get_job_info(job_id)
    return _report(cluster, job_id, info, ok=("PENDING", "RUNNING", "SUCCEEDED"))


def follow(cluster: Cluster, job_id: str) -> int:
    """Stream the job's logs until it ends; 0 if it SUCCEEDED, else 1."""
    print("rungwise: Ctrl-C stops following, not the job", file=sys.stderr, flush=True)
    with cluster.errors(job_id):
        cluster.client.get_job_info(job_id)  # an unknown id fails here, not in the websocket
        try:
            asyncio.run(_tail(cluster, job_id))
        except RuntimeError as exc:  # the websocket dropped; the job goes on
            print(f"rungwise: log stream lost ({cluster.scrub(str(exc))[:200]}); waiting for "
                  "the job to end", file=sys.stderr)
        info = cluster.client.get_job_info(job_id)
        while str(info.status) not in TERMINAL:
            time.sleep(1.0)
            info = cluster.client.get_job_info(job_id)
    return _report(cluster, job_id, info, ok=("SUCCEEDED",))


async def _tail(cluster: Cluster, job_id: str) -> None:
    async for chunk in cluster.client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _report(cluster: Cluster, job_id: str, info: Any, ok: tuple[str, ...]) -> int:
    print(f"status: {info.status}", flush=True)
    if str(info.status) in ok:
        return 0
    print(f"rungwise: job {job_id}: {cluster.scrub(info.message or '')[:2000]}", file=sys.stderr)
    return 1


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="the head's dashboard URL, https://HOST:8265, or http://localhost:PORT "
                        "through an SSH tunnel (default: $RAY_ADDRESS)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain http to a host that is not loopback (sends the Ray token "
                        "in clear text)")


# --- jobs ------------------------------------------------------------------------------


def _add_jobs(sub: Any) -> None:
    p = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs on a cluster")
    jobs = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    q = jobs.add_parser("list", help="a table of the cluster's jobs")
    _add_address(q)
    q.set_defaults(func=cmd_jobs_list)
    for name, func, help_ in (("status", cmd_jobs_status, "status and message of a job"),
                              ("logs", cmd_jobs_logs, "a job's logs"),
                              ("stop", cmd_jobs_stop, "stop a running job")):
        q = jobs.add_parser(name, help=help_)
        q.add_argument("job_id", metavar="ID", help="submission id (see `rungwise jobs list`)")
        _add_address(q)
        if name == "logs":
            q.add_argument("--follow", action="store_true",
                           help="stream until the job ends; exit 0 if it succeeded, else 1")
        q.set_defaults(func=func)


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from jobs.cluster import connect

    cluster = connect(args.address, args.debug, args.insecure)
    with cluster.errors():
        jobs = sorted(cluster.client.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [(j.submission_id or j.job_id or "-", str(j.status), _when(j.start_time),
             _short(j.entrypoint, 60)) for j in jobs]
    header = ("ID", "STATUS", "START", "ENTRYPOINT")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    from jobs.cluster import connect

    cluster = connect(args.address, args.debug, args.insecure)
    with cluster.errors(args.job_id):
        info = cluster.client.get_job_info(args.job_id)
    print(f"{args.job_id}  {info.status}  start {_when(info.start_time)}  "
          f"end {_when(info.end_time)}")
    if info.message:
        print(_short(cluster.scrub(info.message), 500))
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from jobs.cluster import connect

    cluster = connect(args.address, args.debug, args.insecure)
    if args.follow:
        return follow(cluster, args.job_id)
    with cluster.errors(args.job_id):
        sys.stdout.write(cluster.client.get_job_logs(args.job_id))
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from jobs.cluster import connect

    cluster = connect(args.address, args.debug, args.insecure)
    with cluster.errors(args.job_id):
        status = str(cluster.client.get_job_info(args.job_id).status)
        if status in TERMINAL:
            print(f"{args.job_id} has already ended: {status}")
            return 0
        cluster.client.stop_job(args.job_id)
    print(f"stop requested: {args.job_id}")
    return 0
