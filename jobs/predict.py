"""`rungwise predict`: predictions of a registered model for a CSV / Parquet file of raw rows."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from jobs.cli import UserError


def read_rows(spec: Any, path: str) -> Any:
    """Read like the training data (same columns, delimiter, na_values), target optional."""
    from trainer.data import read_table

    if "://" not in path and not Path(path).is_file():  # a URI is read through pyarrow
        raise UserError(f"--input: file not found: {path}")
    data = SimpleNamespace(**{**spec.data.model_dump(), "path": path})
    return read_table(data)


def predict_command(spec: Any, input_path: str, output: str | None, alias: str) -> int:
    from tuning import registry
    from tuning.tracking import resolve_tracking_uri

    name = spec.tracking.register_as
    if not name:
        raise UserError("tracking.register_as: not set in the spec, so there is no registered "
                        "model to predict with")
    uri = resolve_tracking_uri(spec.tracking.uri)
    bundle = registry.load_bundle(uri, name, alias)
    rows = read_rows(spec, input_path)
    features = rows.drop(columns=[spec.data.target], errors="ignore")
    out = rows.copy()
    out["prediction"] = bundle.predict(features)
    if output:
        if output.endswith((".parquet", ".pq")):
            out.to_parquet(output, index=False)
        else:
            out.to_csv(output, index=False)
        print(f"wrote {len(out)} predictions of {name}@{alias} to {output}", file=sys.stderr)
    else:
        out.to_csv(sys.stdout, index=False)
    return 0
