"""`rungwise tune`: run (or resume) a sweep, print the top trials and where to look."""

from __future__ import annotations

import sys
from typing import Any

from jobs.signals import sigterm_as_interrupt
from jobs.spec import JobSpec


def tune_command(spec: JobSpec, resume: bool = False, address: str | None = None,
                 register: bool = True, tracking: bool = True) -> int:
    from tuning.sweep import run_sweep

    sigterm_as_interrupt()  # exit 130 with a resume hint, like Ctrl-C
    print(f"rungwise tune {spec.name}: {spec.tune.num_samples} trials, search "
          f"{spec.tune.search}, metric {spec.tune.metric} ({spec.tune.mode})", flush=True)
    try:
        result = run_sweep(spec, resume=resume, address=address, register=register,
                           tracking=tracking)
    except KeyboardInterrupt:
        print(f"\nrungwise: sweep interrupted; its MLflow runs are marked KILLED. Continue it "
              f"with: rungwise tune {' '.join(sys.argv[2:3]) or 'SPEC'} --resume",
              file=sys.stderr)
        return 130
    print_summary(spec, result)
    return 0


def print_summary(spec: JobSpec, result: Any, top: int = 5) -> None:
    from tuning.display import pairs, short
    from tuning.tracking import mask_secrets, mask_uri

    print(f"\nstrategy: {result.strategy} ({result.reason})")
    key = "best_val_loss"
    rows = sorted(result.trials, key=lambda r: r.get(key, float("inf")))[:top]
    if rows:
        params = [k for k in rows[0] if "." in k]
        header = ["trial", "status", "epochs", key, *params]
        table = [header] + [[str(r["trial_id"]), str(r["status"]), str(r["epochs"]),
                             short(r[key]), *[short(r.get(p, "")) for p in params]]
                            for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        print(f"top {len(rows)} of {len(result.trials)} trials:")
        for row in table:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    best = mask_secrets(result.best_overrides)  # a space may hold URIs: printed masked
    print(f"best {spec.tune.metric}: {short(result.best_value)} with {pairs(best)}")
    print("test: " + pairs(result.test_metrics, sep="  "))
    if result.version:
        print(f"registered: {spec.tracking.register_as} version {result.version} "
              f"(aliases: {', '.join(result.aliases)})")
    if result.tracking_uri:
        uri = mask_uri(result.tracking_uri)
        print(f"mlflow: parent run {result.parent_run_id}; open the UI with:\n"
              f"  mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite")
              else f"mlflow: parent run {result.parent_run_id} at {uri}")
