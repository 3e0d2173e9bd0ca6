"""Where a sweep keeps what outlives one process: a local path, a shared file system or a URI.

``tune.storage`` (default: ``RUNGWISE_STORAGE``, else ``./rungwise-runs`` in the working
directory) names it: a local or NFS path, ``file://``, ``s3://`` (an S3-compatible endpoint comes
from ``AWS_ENDPOINT_URL`` or the URI's query, as pyarrow reads it), ``gs://`` or anything
``pyarrow.fs.FileSystem.from_uri`` opens. A URI is never turned into a local path: every read
and write goes through the pyarrow filesystem, and Ray gets the same filesystem for trial
checkpoints and its experiment state. ``preflight`` checks, before anything is written, that
every alive node of the Ray cluster reads what the driver wrote there.

This module imports pyarrow only (no Ray at import time): ``rungwise retrain`` takes its lease
here before Ray or MLflow load.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.fs as pafs

from tuning.errors import RungwiseError

ENV = "RUNGWISE_STORAGE"
DEFAULT = "rungwise-runs"
PREFLIGHT_DIR = ".rungwise-preflight"
PREFLIGHT_TIMEOUT_S = 120.0
FIX = ("set tune.storage (or RUNGWISE_STORAGE) to a shared file system mounted at the same path "
       "on every node, or to an object store URI such as s3://bucket/prefix")


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@dataclass(frozen=True)
class Storage:
    """An opened storage root: the filesystem and the root's path on it."""

    given: str
    """What the user wrote (for messages, with any query removed)."""
    fs: pafs.FileSystem
    root: str
    """The root's path on ``fs`` (``bucket/prefix`` for s3, an absolute path when local)."""
    scheme: str = ""
    """``""`` for a local path, else the URI's scheme (``s3``, ``gs``, ...)."""
    query: str = ""

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def uri(self, fs_path: str) -> str:
        """What other processes open with ``from_uri`` (or a plain path when local)."""
        if not self.scheme:
            return fs_path
        return f"{self.scheme}://{fs_path}" + (f"?{self.query}" if self.query else "")

    def shown(self, fs_path: str | None = None) -> str:
        """For messages: the URI without its query (which may hold credentials)."""
        path = self.root if fs_path is None else fs_path
        return f"{self.scheme}://{path}" if self.scheme else path

    def path(self, *parts: str) -> StoragePath:
        return StoragePath(self, str(PurePosixPath(self.root, *parts)))


def open_storage(value: str | None = None) -> Storage:
    """Open ``value`` (else ``RUNGWISE_STORAGE``, else ``./rungwise-runs``)."""
    given = value or os.environ.get(ENV) or DEFAULT
    if "://" not in given:
        return Storage(given, pafs.LocalFileSystem(), str(Path(given).expanduser().absolute()))
    scheme, _, rest = given.partition("://")
    _, _, query = rest.partition("?")
    try:
        fs, root = pafs.FileSystem.from_uri(given)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RungwiseError(f"tune.storage: cannot open {given.split('?')[0]!r}: {first}; "
                            f"give a local path or a URI that pyarrow opens (s3://, gs://, "
                            "file://, ...)") from None
    if isinstance(fs, pafs.LocalFileSystem):  # file:///x is the local path /x
        return Storage(given, fs, root)
    return Storage(given, fs, root.rstrip("/"), scheme.lower(), query)


def spec_folder(spec: Any) -> StoragePath:
    """``<storage>/<spec name>``: where a spec's sweeps, their state file and its retrain
    lease live (the one place that computes it)."""
    return open_storage(spec.tune.storage).path(safe_name(spec.name))


class StoragePath:
    """A path inside a storage, read and written through its pyarrow filesystem.

    Just enough of ``pathlib.Path`` for a state file: ``/``, ``name``, ``parent``,
    ``mkdir``, ``is_file``, ``read_text``, ``write_text``, ``unlink``; ``str()`` is the URI
    (a plain path when local)."""

    def __init__(self, storage: Storage, fs_path: str) -> None:
        self.storage, self.fs_path = storage, fs_path

    def __truediv__(self, part: str) -> StoragePath:
        return StoragePath(self.storage, str(PurePosixPath(self.fs_path, part)))

    def __str__(self) -> str:
        return self.storage.uri(self.fs_path)

    def __repr__(self) -> str:
        return f"StoragePath({self.shown!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoragePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def shown(self) -> str:
        return self.storage.shown(self.fs_path)

    @property
    def name(self) -> str:
        return PurePosixPath(self.fs_path).name

    @property
    def parent(self) -> StoragePath:
        return StoragePath(self.storage, str(PurePosixPath(self.fs_path).parent))

    @property
    def fs(self) -> pafs.FileSystem:
        return self.storage.fs

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.fs.create_dir(self.fs_path, recursive=True)

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.fs_path).type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.fs_path).type == pafs.FileType.Directory

    def read_text(self) -> str:
        with self.fs.open_input_stream(self.fs_path, compression=None) as f:
            return bytes(f.read()).decode()

    def write_text(self, text: str) -> None:
        """Whole or not at all: an object store's PUT is atomic; locally, write and rename."""
        if not self.storage.local:
            with self.fs.open_output_stream(self.fs_path, compression=None) as f:
                f.write(text.encode())
            return
        tmp = f"{self.fs_path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp, compression=None) as f:
            f.write(text.encode())
        self.fs.move(tmp, self.fs_path)

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        try:
            self.fs.delete_dir(self.fs_path)
        except (FileNotFoundError, OSError):
            pass


def child_of(folder: StoragePath, named: Any) -> StoragePath:
    """``folder / <last part of named>``, only if ``named`` *is* that child (no ``..``, no path
    elsewhere): what a state file says is never trusted further than that."""
    text = str(named or "").split("?")[0].rstrip("/")
    leaf = PurePosixPath(text).name
    expected = folder / leaf if leaf not in ("", ".", "..") else None
    if expected is None or text != expected.shown:
        raise RungwiseError(f"--resume: the sweep state names {text!r}, which is not a sweep "
                            f"folder directly under {folder.shown}; refusing to restore from it "
                            "(delete the state file or run without --resume)")
    return expected


# --- preflight ----------------------------------------------------------------------------


def _probe(fs: pafs.FileSystem, folder: str, token: str, node_id: str) -> tuple[str, str]:
    """On one node: read the driver's marker, write this node's. Returns (problem, node ip)."""
    import ray

    ip = ray.util.get_node_ip_address()
    try:
        with fs.open_input_stream(f"{folder}/driver") as f:
            seen = bytes(f.read()).decode()
    except FileNotFoundError:
        return "the marker the driver wrote there is not visible from this node", ip
    except Exception as exc:
        return f"cannot read it ({_first_line(exc)})", ip
    if seen != token:
        return "it reads back something else than the driver wrote", ip
    try:
        with fs.open_output_stream(f"{folder}/node-{node_id}") as f:
            f.write(token.encode())
    except Exception as exc:
        return f"cannot write to it ({_first_line(exc)})", ip
    return "", ip


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def preflight(storage: Storage, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> int:
    """Check that every alive node of the connected Ray cluster reads and writes ``storage``.

    The driver writes a marker; a task pinned to each alive node (hard node affinity, no CPU,
    so it runs on a head started with ``--num-cpus 0`` too) reads it back and writes its own;
    the driver reads those back. Raises ``RungwiseError`` naming the first node that cannot.
    Returns the number of nodes checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    folder = storage.path(PREFLIGHT_DIR, token)
    try:
        folder.mkdir()
        (folder / "driver").write_text(token)
    except Exception as exc:
        raise RungwiseError(f"tune.storage: the driver cannot write to {storage.shown()}: "
                            f"{_first_line(exc)}") from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False)).remote(storage.fs, folder.fs_path, token,
                                                     n["NodeID"]): n for n in nodes}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in late:
            ray.cancel(ref, force=True)
            _refuse(storage, refs[ref], f"its check did not finish in {timeout_s:g} s")
        for ref in ready:
            problem, _ = ray.get(ref)
            node = refs[ref]
            if not problem and not (folder / f"node-{node['NodeID']}").is_file():
                problem = "what this node wrote there is not visible to the driver"
            if problem:
                _refuse(storage, node, problem)
        return len(nodes)
    finally:
        folder.rmtree()


def _refuse(storage: Storage, node: dict[str, Any], problem: str) -> None:
    where = f"{node.get('NodeManagerAddress', '?')} (node id {str(node['NodeID'])[:12]})"
    raise RungwiseError(f"tune.storage: node {where} cannot use {storage.shown()}: {problem}; "
                        f"{FIX}")
