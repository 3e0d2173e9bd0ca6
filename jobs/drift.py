"""`rungwise drift`, and what a retrain checks before it trains: quality gate, drift trigger.

``rungwise drift SPEC --input FILE`` compares new rows with the training profile that a
registered model carries (trainer/profile.py, tuning/drift.py), prints one line per column and,
last, ``drift: a, b`` or ``no drift``; the report also goes to an MLflow run (metrics
``drift.<column>.psi``, artifacts ``drift/report.{txt,html,png}``). Exit 0, or 3 with
``--fail-on-drift`` when a column the model uses drifted.

``before_retrain`` runs first in every retrain (jobs/retrain.py): the data quality gate
(jobs/quality.py; a failure exits 2, logs a ``rejected`` run and leaves the registry alone),
then, with ``schedule.trigger: drift``, the comparison with the champion: no drift -> one run
tagged ``rungwise.decision=skipped`` and no sweep; drift -> the usual retrain, whose run gets
the report and the drifted columns as tags.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.spec import JobSpec
from trainer.errors import UserError

EXIT_DRIFT = 3
DECISION_FILE = "RUNGWISE_DECISION_FILE"
"""Set by `rungwise schedule` for its child: the retrain writes its one-line decision there."""


@dataclass
class Reference:
    name: str
    alias: str
    version: str
    profile: dict[str, Any] | None


def reference(uri: str, name: str, alias: str) -> Reference | None:
    """The profile saved with ``models:/name@alias``; None when there is no such version."""
    import mlflow

    from trainer import profile
    from tuning.registry import alias_version

    version = alias_version(uri, name, alias)
    if version is None:
        return None
    mlflow.set_tracking_uri(uri)
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    # only profile.json is fetched: nothing else of the artifact is read or even copied
    repo = ModelsArtifactRepository(f"models:/{name}@{alias}")
    found = {Path(f.path).name for f in repo.list_artifacts("artifacts/bundle")}
    if profile.NAME not in found:
        return Reference(name, alias, str(version.version), None)
    with tempfile.TemporaryDirectory() as tmp:
        local = repo.download_artifacts(f"artifacts/bundle/{profile.NAME}", dst_path=tmp)
        try:
            prof = profile.load(Path(local).parent)
        except profile.ProfileError as exc:
            raise UserError(f"{name}@{alias}: {exc}") from None
    return Reference(name, alias, str(version.version), prof)


def no_profile(ref: Reference) -> str:
    return (f"{ref.name}@{ref.alias} (version {ref.version}) carries no training profile: it "
            "was registered by a rungwise without drift checks; retrain or re-tune it once to "
            "give it one")


def header(ref: Reference, rows: int, what: str) -> str:
    assert ref.profile is not None
    return (f"rungwise drift: {rows} rows of {what} against {ref.name}@{ref.alias} "
            f"(version {ref.version}), trained on {ref.profile.get('rows', '?')} rows")


def log_run(spec: JobSpec, uri: str, tags: dict[str, str], report: Any = None, title: str = "",
            text: str = "") -> str:
    """A finished MLflow run in the spec's experiment holding ``tags`` and the report."""
    from tuning.drift_report import log_to_run
    from tuning.tracking import client, experiment_id

    cl = client(uri)
    exp = experiment_id(cl, spec.tracking.experiment or spec.name)
    run_id = cl.create_run(exp, run_name=f"{tags['rungwise.kind']}-{spec.name}",
                           tags=tags).info.run_id
    try:
        if report is not None:
            log_to_run(cl, run_id, report, spec.schedule.drift, title, text)
        elif text:
            cl.log_text(run_id, text + "\n", "quality/report.txt")
    except BaseException as exc:  # no run left RUNNING, and none FINISHED that did not
        cl.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    cl.set_terminated(run_id, "FINISHED")
    return str(run_id)


def drift_command(spec: JobSpec, input_path: str, alias: str, fail_on_drift: bool) -> int:
    from jobs.predict import read_rows
    from trainer.data import detect_format
    from tuning.drift import compare, table
    from tuning.tracking import check_reachable, resolve_tracking_uri

    name = spec.tracking.register_as
    if not name:
        raise UserError("tracking.register_as: not set in the spec, so there is no registered "
                        "model to compare with")
    if detect_format(spec.data.path, spec.data.format) == "npz":
        raise UserError(f"data.path: {spec.data.path} holds images (.npz); drift checks "
                        "compare table columns (CSV or Parquet) only")
    uri = resolve_tracking_uri(spec.tracking.uri)
    check_reachable(uri)  # a server that is down: one line now, not minutes of retries
    ref = reference(uri, name, alias)
    if ref is None:
        raise UserError(f"registry: no model version {name}@{alias}; run `rungwise tune` first "
                        "or pick another --alias")
    if ref.profile is None:
        raise UserError(no_profile(ref))
    rows, _ = read_rows(spec, input_path, list(ref.profile["columns"]))
    report = compare(ref.profile, rows, spec.schedule.drift)
    head = header(ref, len(rows), input_path)
    text = "\n".join([head, *table(report)])
    run_id = log_run(spec, uri, {"rungwise.kind": "drift", "rungwise.drift": _cols(report),
                                 "rungwise.model_version": f"{name}/{ref.version}"},
                     report, head, text)
    print(text, flush=True)
    print(f"mlflow run {run_id}: metrics drift.<column>.psi, artifacts drift/report.*",
          file=sys.stderr)
    return EXIT_DRIFT if fail_on_drift and report.drifted else 0


def _cols(report: Any) -> str:
    return (", ".join(report.drifted) or "none")[:4000]


# --- before a retrain ------------------------------------------------------------------------


@dataclass
class Skipped:
    """A retrain that trained nothing because the data did not move."""

    name: str
    reason: str
    run_id: str
    text: str

    def report(self) -> str:
        return "\n".join([self.text, f"rungwise retrain {self.name}: SKIPPED ({self.reason})",
                          f"  mlflow      run {self.run_id} (tags rungwise.decision=skipped, "
                          "rungwise.reason); registry untouched"])


@dataclass
class Precheck:
    uri: str
    skipped: Skipped | None = None
    report: Any = None
    title: str = ""
    text: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def attach(self, run_id: str, spec: JobSpec) -> None:
        """The drift report and trigger tags on the retrain's run."""
        from tuning.drift_report import log_to_run
        from tuning.tracking import client

        cl = client(self.uri)
        for key, value in self.tags.items():
            cl.set_tag(run_id, key, value)
        if self.report is not None:
            log_to_run(cl, run_id, self.report, spec.schedule.drift, self.title, self.text)


def before_retrain(spec: JobSpec, name: str) -> Precheck:
    """Quality gate, then (``trigger: drift``) the comparison with the champion."""
    from trainer.data import detect_format, read_table
    from tuning.drift import compare, table
    from tuning.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(spec.tracking.uri)
    if detect_format(str(spec.data.path), spec.data.format) == "npz":  # images: no profile
        if spec.schedule.trigger == "drift":
            print(f"rungwise retrain {spec.name}: trigger drift: drift checks compare table "
                  "columns, not images; retraining", flush=True)
        return Precheck(uri, tags={"rungwise.trigger": spec.schedule.trigger})
    frame = read_table(spec.data)  # a broken file fails here, before the registry is touched
    check_reachable(uri)
    ref = reference(uri, name, "champion")
    gate(spec, uri, frame, ref)
    pre = Precheck(uri, tags={"rungwise.trigger": spec.schedule.trigger})
    if spec.schedule.trigger != "drift":
        return pre
    if ref is None or ref.profile is None:
        why = "no champion yet" if ref is None else no_profile(ref)
        print(f"rungwise retrain {spec.name}: trigger drift: {why}; retraining", flush=True)
        pre.tags["rungwise.drift"] = "unknown"
        return pre
    report = compare(ref.profile, frame.drop(columns=[spec.data.target]), spec.schedule.drift)
    pre.report, pre.title = report, header(ref, len(frame), spec.data.path)
    pre.text = "\n".join([pre.title, *table(report)])
    pre.tags["rungwise.drift"] = _cols(report)
    if report.drifted:
        print(pre.text, flush=True)
        return pre
    reason = f"no drift: {report.summary()}"
    run_id = log_run(spec, uri, {"rungwise.kind": "retrain", "rungwise.trigger": "drift",
                                 "rungwise.decision": "skipped", "rungwise.reason": reason,
                                 "rungwise.drift": "none",
                                 "rungwise.champion_version": ref.version},
                     report, pre.title, pre.text)
    note_decision(f"skipped: {reason}")
    pre.skipped = Skipped(spec.name, reason, run_id, pre.text)
    return pre


def gate(spec: JobSpec, uri: str, frame: Any, ref: Reference | None) -> None:
    """Exit 2 (a UserError) with one line per problem when the new data fails the gate."""
    from jobs.quality import check

    problems = check(frame, spec.data.target, spec.data.task, ref.profile if ref else None)
    if not problems:
        return
    reason = f"data quality: {len(problems)} problem{'s' * (len(problems) > 1)}"
    text = "\n".join(f"quality: {p}" for p in problems)
    run_id = log_run(spec, uri, {"rungwise.kind": "retrain", "rungwise.decision": "rejected",
                                 "rungwise.reason": f"{reason}: {problems[0]}"[:4000]},
                     text=text)
    print(text, file=sys.stderr, flush=True)
    note_decision(f"rejected: {reason}")
    raise UserError(f"retrain: {reason} in {spec.data.path}; nothing was trained, the registry "
                    f"is untouched (mlflow run {run_id})")


def note_decision(line: str) -> None:
    """Hand the decision to `rungwise schedule`, when it started this retrain."""
    path = os.environ.get(DECISION_FILE)
    if path:
        Path(path).write_text(line.splitlines()[0][:500] + "\n")
