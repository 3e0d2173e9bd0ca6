"""Write the generated files of the bad-input corpus (deterministic, every file tiny).

    .venv/bin/python tests/badinput/make_corpus.py          # into tests/badinput/
    .venv/bin/python tests/badinput/make_corpus.py OUTDIR   # elsewhere (the test compares)

Hand-written YAML specs live in ``specs/``; this script writes the data files (``data/``),
the valid tables the bad specs point at (``good/``) and the one spec that cannot be written
by hand as text (``specs/latin1_spec.yaml``, not UTF-8). What each data file must make
rungwise say is listed in ``test_corpus.py`` (``DATA_CASES``).
"""

from __future__ import annotations

import gzip
import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
COLORS = ("red", "green", "blue")


def ok_rows(n: int = 40) -> list[tuple[int, str, str]]:
    """``age, color, y``: a small valid classification table (two classes, 20 rows each)."""
    return [(20 + (i * 7) % 50, COLORS[i % 3], "yes" if i % 2 else "no") for i in range(n)]


def csv_text(rows: list[tuple[object, ...]], header: str = "age,color,y", sep: str = ",") -> str:
    lines = [header.replace(",", sep)] if header else []
    lines += [sep.join("" if v is None else str(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


def _text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text, encoding="utf-8")


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _gzip(text: str) -> Callable[[Path], None]:
    # mtime=0: the same bytes on every run
    def write(path: Path) -> None:
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as fh:
            fh.write(text.encode())
        path.write_bytes(buf.getvalue())
    return write


def _parquet(table: pa.Table) -> Callable[[Path], None]:
    return lambda path: pq.write_table(table, path)


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as fh:  # a file object: np.savez adds no .npz suffix to it
            np.savez(fh, **arrays)
    return write


def _images(n: int = 30, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 16, size=(n, 8, 8)).astype(np.uint8)
    y = (np.arange(n) % classes).astype(np.int64)
    return x, y


def _nan_images() -> np.ndarray:
    x = _images()[0].astype(np.float32)
    x[3, 2, 2] = np.nan
    return x


def good_files() -> dict[str, Callable[[Path], None]]:
    rows = ok_rows()
    with_empty = [(a, c, None, y) for a, c, y in rows]
    return {
        "ok.csv": _text(csv_text(rows)),
        # valid with a warning: a column with no value at all is dropped, not an error
        "all_missing_column.csv": _text(csv_text(with_empty, header="age,color,empty,y")),
    }


def data_files() -> dict[str, Callable[[Path], None]]:
    rows = ok_rows()
    x, y = _images()
    nested_list = pa.table({"age": [r[0] for r in rows], "tags": [[r[1], "x"] for r in rows],
                            "y": [r[2] for r in rows]})
    nested_struct = pa.table({"age": [r[0] for r in rows],
                              "where": [{"city": "a", "zip": i} for i in range(len(rows))],
                              "y": [r[2] for r in rows]})
    return {
        "empty.csv": _bytes(b""),
        "header_only.csv": _text("age,color,y\n"),
        "semicolon.csv": _text(csv_text(rows, sep=";")),
        "target_all_missing.csv": _text(csv_text([(a, c, None) for a, c, _ in rows])),
        "target_all_na_values.csv": _text(csv_text([(a, c, "?") for a, c, _ in rows])),
        "target_some_missing.csv": _text(csv_text(
            [(a, c, None if i in (3, 17) else t) for i, (a, c, t) in enumerate(rows)])),
        "single_class.csv": _text(csv_text([(a, c, "yes") for a, c, _ in rows])),
        "text_target_regression.csv": _text(csv_text(rows)),
        "infinite_target_regression.csv": _text(csv_text(
            [(a, c, "inf" if i == 5 else float(i)) for i, (a, c, _) in enumerate(rows)])),
        "huge_categorical.csv.gz": _gzip(csv_text(
            [(i % 90, f"id{i:05d}", "yes" if i % 2 else "no") for i in range(1200)],
            header="age,customer,y")),
        "only_target.csv": _text(csv_text([(r[2],) for r in rows], header="y")),
        "latin1.csv": _bytes(csv_text([(a, "caf\u00e9", t) for a, _, t in rows]).encode("latin-1")),
        "utf16.csv": _bytes(csv_text(rows).encode("utf-16")),
        "ragged.csv": _text(csv_text(rows[:10]) + "1,red,yes,extra,fields\n" +
                            csv_text(rows[10:], header="")),
        "corrupt.csv.gz": _bytes(b"\x1f\x8b\x08\x00" + bytes(range(200, 256)) * 4),
        "too_few_rows.csv": _text(csv_text(rows[:3])),  # no row left for the test split
        "nested_list.parquet": _parquet(nested_list),
        "nested_struct.parquet": _parquet(nested_struct),
        "not_parquet.parquet": _text(csv_text(rows)),
        "empty.parquet": _bytes(b""),
        "no_xy.npz": _npz(images=x, labels=y),
        "flat_x.npz": _npz(x=x.reshape(len(x), -1), y=y),
        "nan_pixels.npz": _npz(x=_nan_images(), y=y),
        "single_class.npz": _npz(x=x, y=np.zeros_like(y)),
        "object_array.npz": _npz(x=np.array([{"a": 1}] * 3, dtype=object), y=y[:3]),
        "not_npz.npz": _text("x,y\n1,2\n"),
    }


def spec_files() -> dict[str, Callable[[Path], None]]:
    latin1 = ("# expect: not UTF-8 text\nname: caf\u00e9\ndata: {path: ../good/ok.csv}\n")
    return {"latin1_spec.yaml": _bytes(latin1.encode("latin-1")),
            "empty.yaml": _bytes(b"")}  # no room for an "# expect:" line: see test_corpus


def write_all(root: Path = HERE) -> list[Path]:
    written = []
    for folder, files in (("good", good_files()), ("data", data_files()),
                          ("specs", spec_files())):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, write in files.items():
            write(root / folder / name)
            written.append(root / folder / name)
    directory = root / "data" / "a_directory.csv"  # data.path naming a folder
    directory.mkdir(exist_ok=True)
    (directory / "README").write_text("data.path pointing here must be refused: a folder\n")
    written.append(directory)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for p in write_all(out):
        print(p)
