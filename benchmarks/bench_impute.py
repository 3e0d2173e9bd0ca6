"""Imputer vs scikit-learn SimpleImputer on a 1,000,000 x 20 mixed frame, same process.

Both sides do the same work: mean or median on 14 float columns and most-frequent on 6 ``str``
columns (~10% missing each), fit and transform. Times are best of 3; ``ratio`` is
imputer_s / simpleimputer_s summed over the mean and median configurations (below 1 means the
Imputer is faster). ``peak_mem_ratio`` is the peak resident-memory growth during one
``Imputer(numeric="median", categorical="mode").fit_transform`` divided by the input frame's
size (pyarrow string buffers included, which tracemalloc would not see).

Usage: python benchmarks/bench_impute.py [--rows N]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import pandas as pd
from sklearn.impute import SimpleImputer

from trainer.impute import Imputer

N_NUMERIC, N_CATEGORICAL, MISSING = 14, 6, 0.10


def make_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """14 float64 columns and 6 str columns (20-200 categories), ~10% missing in each."""
    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {}
    for i in range(N_NUMERIC):
        x = rng.normal(i, 1 + i, rows)
        x[rng.random(rows) < MISSING] = np.nan
        cols[f"num{i}"] = x
    for i in range(N_CATEGORICAL):
        vocab = np.array([f"cat{i}_{k}" for k in range(20 + 30 * i)], dtype=object)
        values = vocab[rng.zipf(1.5, rows) % len(vocab)]
        values[rng.random(rows) < MISSING] = None
        cols[f"cat{i}"] = pd.array(values, dtype="str")
    return pd.DataFrame(cols)


def run_sklearn(df: pd.DataFrame, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    num = [c for c in df.columns if c.startswith("num")]
    cat = [c for c in df.columns if c.startswith("cat")]
    a = SimpleImputer(strategy=strategy).fit_transform(df[num])
    b = SimpleImputer(strategy="most_frequent").fit_transform(df[cat])
    return a, b


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(fn: Callable[[], object]) -> int:
    """Peak RSS above the level before ``fn``, sampled every millisecond in a thread."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = fn()
    peak[0] = max(peak[0], _rss())
    done.set()
    thread.join()
    del result
    return max(peak[0] - base, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    df = make_frame(args.rows)
    by: dict[str, dict[str, float]] = {}
    for strategy in ("mean", "median"):
        imputer = Imputer(numeric=strategy, categorical="mode")
        ours = best_of(partial(imputer.fit_transform, df))
        theirs = best_of(partial(run_sklearn, df, strategy))
        by[strategy] = {"imputer_s": round(ours, 3), "simpleimputer_s": round(theirs, 3),
                        "ratio": round(ours / theirs, 3)}
    grow = peak_growth(lambda: Imputer(numeric="median", categorical="mode").fit_transform(df))
    ours = sum(v["imputer_s"] for v in by.values())
    theirs = sum(v["simpleimputer_s"] for v in by.values())
    print(json.dumps({
        "bench": "impute", "rows": args.rows, "cols": df.shape[1],
        "imputer_s": round(ours, 3), "simpleimputer_s": round(theirs, 3),
        "ratio": round(ours / theirs, 3),
        "peak_mem_ratio": round(grow / df.memory_usage(deep=True).sum(), 3),
        "by_strategy": by,
    }))


if __name__ == "__main__":
    main()
