"""Build data/digits/digits.npz from scikit-learn's bundled copy of the UCI digits.

    python examples/make_digits.py

No network: ``sklearn.datasets.load_digits`` reads a file shipped inside scikit-learn.
Writes ``x`` uint8 (1797, 8, 8) with grey levels 0..16 and ``y`` int64 (1797,) digits 0..9;
``trainer.pipeline`` scales the pixels with statistics of the training split only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "data" / "digits" / "digits.npz"


def build(path: Path = OUT) -> Path:
    digits = load_digits()
    x = digits.images.astype(np.uint8)  # (N, 8, 8), integer grey levels 0..16
    y = digits.target.astype(np.int64)  # (N,)
    assert x.shape == (1797, 8, 8) and int(x.max()) == 16 and set(y.tolist()) == set(range(10))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=x, y=y)
    return path


def main() -> None:
    path = build()
    with np.load(path) as npz:
        x, y = npz["x"], npz["y"]
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()  # the file's zip dates vary
    print(f"wrote {path}: x {x.shape} {x.dtype}, y {y.shape} {y.dtype}; "
          f"sha256(x bytes + y bytes) {digest}")


if __name__ == "__main__":
    main()
