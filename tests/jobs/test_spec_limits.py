"""load_spec checks the file before reading it, and the spec bounds what no machine can run."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from jobs.spec import MAX_SPEC_BYTES, SpecError, load_spec, validate_spec

GOOD = "name: t\ndata: {path: /t.csv}\n"


def _refusal(path: Path, within_s: float = 10) -> str:
    """load_spec's one-line refusal, from a thread: a read that blocks fails the test."""
    out: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            load_spec(path)
            out["exc"] = None
        except BaseException as exc:  # noqa: BLE001 (reported below)
            out["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(within_s)
    assert not t.is_alive(), f"load_spec({path}) still running after {within_s} s"
    exc = out["exc"]
    assert isinstance(exc, SpecError), exc
    assert "\n" not in str(exc)
    return str(exc)


def test_a_2_mb_spec_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(GOOD + "#" * (2_000_000 - len(GOOD)))
    assert _refusal(path) == f"spec file is 2,000,000 bytes; the limit is {MAX_SPEC_BYTES:,}"


def test_a_huge_sparse_spec_is_refused_without_reading_it(tmp_path: Path) -> None:
    """64 GiB (sparse: no disk used): reading it first would take minutes and the memory."""
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(64 * 2**30)
    t0 = time.perf_counter()
    assert _refusal(path) == f"spec file is {64 * 2**30:,} bytes; the limit is 1,000,000"
    assert time.perf_counter() - t0 < 2


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    os.mkfifo(path)
    assert _refusal(path) == f"{path}: not a regular file; a job spec is a YAML file"


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_dev_zero_is_refused() -> None:
    assert _refusal(Path("/dev/zero")) == "/dev/zero: not a regular file; a job spec is a YAML file"


def test_a_symlink_to_a_spec_is_read(tmp_path: Path) -> None:
    (tmp_path / "real.yaml").write_text(GOOD)
    (tmp_path / "link.yaml").symlink_to(tmp_path / "real.yaml")
    assert load_spec(tmp_path / "link.yaml").name == "t"


def test_a_directory_is_not_a_spec(tmp_path: Path) -> None:
    assert _refusal(tmp_path) == f"spec file not found: {tmp_path} is a directory"


# --- upper bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train.batch_size", 2**24 + 1, "train.batch_size: Input should be less than or equal to "
                                    "16777216; got 16777217"),
    ("train.threads", 1025, "train.threads: Input should be less than or equal to 1024; "
                            "got 1025"),
    ("tune.max_concurrent", 10_001, "tune.max_concurrent: Input should be less than or equal "
                                    "to 10000; got 10001"),
    ("resources.cpus_per_worker", 2000, "resources.cpus_per_worker: Input should be less "
                                        "than or equal to 1024; got 2000"),
    ("model.hidden", [2**20 + 1], "model.hidden: at most 64 layers of at most 1,048,576 units "
                                  "each, got [1048577]"),
    ("model.channels", [8] * 65, "model.channels: at most 64 layers of at most 1,048,576 "
                                 "units each, got [8, 8, 8, 8, 8, 8, 8, 8, ...] (65 layers)"),
])
def test_absurd_sizes_are_refused_naming_the_key(key: str, value: object, message: str) -> None:
    section, name = key.split(".")
    raw = {"name": "t", "data": {"path": "/t.csv"}, section: {name: value}}
    with pytest.raises(SpecError) as info:
        validate_spec(raw, base_dir=None)
    assert str(info.value) == message


def test_the_bounds_themselves_are_allowed() -> None:
    raw = {"name": "t", "data": {"path": "/t.csv"},
           "train": {"batch_size": 2**24, "threads": 1024},
           "tune": {"max_concurrent": 10_000}, "model": {"hidden": [2**20] + [1] * 63}}
    spec = validate_spec(raw, base_dir=None)
    assert (spec.train.batch_size, spec.tune.max_concurrent) == (2**24, 10_000)
