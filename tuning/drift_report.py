"""A drift report as files (text, HTML, PNG) and as metrics and artifacts on an MLflow run.

Metrics: ``drift.<column>.psi`` per judged column (and ``drift.<column>.missing``, the missing
share now), ``drift.columns_moved``. Artifacts under ``drift/``: ``report.txt`` (what the command
printed), ``report.html`` (the same table), ``report.png`` (PSI per column against the
threshold; drifted columns in red).
"""

from __future__ import annotations

import html
import re
import tempfile
from pathlib import Path
from typing import Any

from tuning.drift import DriftReport, DriftSpec, table

_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(column: str, stat: str) -> str:
    """``drift.<column>.<stat>`` with characters MLflow refuses in a key replaced by ``_``."""
    return f"drift.{_KEY.sub('_', column)[:200]}.{stat}"


def metrics(report: DriftReport) -> dict[str, float]:
    out = {"drift.columns_moved": float(len(report.drifted))}
    for c in report.columns:
        if c.psi is not None:
            out[metric_key(c.name, "psi")] = float(c.psi)
        out[metric_key(c.name, "missing")] = float(c.missing_now)
    return out


def write_html(report: DriftReport, th: DriftSpec, title: str, path: Path) -> None:
    rows = []
    for c in report.columns:
        style = ' style="color:#b00020;font-weight:bold"' if c.drifted else ""
        cells = [c.name, c.kind, "-" if c.psi is None else f"{c.psi:.3f}",
                 "-" if c.ks is None else f"{c.ks:.3f}",
                 "-" if c.pvalue is None else f"{c.pvalue:.2g}",
                 "-" if c.missing_then is None else f"{c.missing_then:.1%}",
                 f"{c.missing_now:.1%}", ", ".join(list(c.unseen)[:10]) or "-", c.verdict()]
        rows.append(f"<tr{style}>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells)
                    + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("column", "kind", "psi", "ks", "p", "missing then",
                                              "missing now", "unseen", "verdict"))
    path.write_text(
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1><p>{report.rows} new rows against {report.reference_rows}"
        f" training rows; thresholds: psi {th.psi:g}, alpha {th.alpha:g}, missing "
        f"{th.missing:g}, min_rows {th.min_rows}</p><table border=1 cellpadding=4>"
        f"<tr>{head}</tr>{''.join(rows)}</table><p><b>{html.escape(report.last_line())}"
        "</b></p>\n")


def write_png(report: DriftReport, th: DriftSpec, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judged = [c for c in report.columns if c.psi is not None]
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(3, len(judged)) + 1.2))
    try:
        names = [c.name for c in judged]
        colors = ["#b00020" if c.drifted else ("#999999" if not c.used else "#3a6ea5")
                  for c in judged]
        ax.barh(names, [c.psi or 0.0 for c in judged], color=colors)
        for i, c in enumerate(judged):  # why a column drifted, next to its bar
            if c.moved:
                ax.text(c.psi or 0.0, i, "  " + ", ".join(c.reasons), va="center", fontsize=7)
        ax.axvline(th.psi, color="black", linestyle="--", label=f"psi threshold {th.psi:g}")
        ax.invert_yaxis()
        ax.set_xlabel("population stability index")
        ax.set_title(f"{title}\n{report.last_line()}", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def write_files(report: DriftReport, th: DriftSpec, title: str, text: str,
                folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "report.txt", folder / "report.html", folder / "report.png"]
    paths[0].write_text(text + "\n")
    write_html(report, th, title, paths[1])
    write_png(report, th, title, paths[2])
    return paths


def log_to_run(cl: Any, run_id: str, report: DriftReport, th: DriftSpec, title: str,
               text: str) -> None:
    """Metrics ``drift.<column>.psi`` and the ``drift/`` artifacts on an existing run."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, 0) for k, v in metrics(report).items()]
    for i in range(0, len(items), 1000):  # MLflow takes at most 1,000 metrics per call
        cl.log_batch(run_id, metrics=items[i:i + 1000])
    with tempfile.TemporaryDirectory() as tmp:
        write_files(report, th, title, text, Path(tmp) / "drift")
        cl.log_artifacts(run_id, str(Path(tmp) / "drift"), "drift")


def report_text(report: DriftReport, header: str) -> str:
    return "\n".join([header, *table(report)])
