"""`rungwise inspect`: the data as rungwise will see it, and what imputation will do.

Dropping a column or rows needs a person's judgement (the lecture): this shows, per column,
its kind, how much of it is missing in the training split, and the planned action.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jobs.spec import JobSpec

if TYPE_CHECKING:
    import pandas as pd


def inspect_spec(spec: JobSpec) -> str:
    # imported here: `rungwise inspect` reports a bad spec before pandas and sklearn load
    from trainer.data import Images
    from trainer.pipeline import make_imputer, split_data

    raw = split_data(spec.data)
    lines = [f"spec: {spec.name}   data: {spec.data.path}   fingerprint: {raw.fingerprint}"]
    train = raw.train
    rows = f"{len(train)}/{len(raw.val)}/{len(raw.test)}"
    if isinstance(train, Images):
        lines.append(f"images: {tuple(train.x.shape[1:])} (C, H, W); rows train/val/test: "
                     f"{rows}; classes: {len(set(train.y.tolist()))}; "
                     "no missing values (images)")
        return "\n".join(lines)
    assert raw.schema is not None
    schema = raw.schema
    lines.append(f"task: {schema.task}   target: {schema.target}   rows train/val/test: {rows}")
    if schema.task == "classification":
        shares = train[schema.target].value_counts(normalize=True)
        lines.append("classes (train): " + ", ".join(f"{k}={v:.1%}" for k, v in shares.items()))
    imputer = make_imputer(spec.impute)
    plan = imputer.describe_plan(train[schema.features])
    lines.append(f"impute: numeric={spec.impute.numeric} categorical={spec.impute.categorical} "
                 f"drop_columns_above={spec.impute.drop_columns_above} "
                 f"indicator={spec.impute.indicator}")
    lines.append("")
    lines.append(_table(plan, train))
    dropped = sum(1 for row in plan if str(row["action"]).startswith("drop column"))
    if dropped:
        lines.append(f"\n{dropped} column(s) will be dropped: check that this is what you want "
                     "(impute.drop_columns_above).")
    return "\n".join(lines)


def _table(plan: list[dict[str, Any]], train: pd.DataFrame) -> str:
    header = ("column", "kind", "distinct", "missing(train)", "action")
    rows = [header]
    for row in plan:
        col = row["column"]
        ind = "  + indicator" if row.get("indicator") else ""
        rows.append((col, row["kind"], str(int(train[col].nunique())),
                     f"{row['missing_fraction']:.1%}", f"{row['action']}{ind}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
