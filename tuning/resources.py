"""Resources settled once, before Tune starts: the GPUs each worker reserves, the device it
trains on, and whether the Ray cluster (as it is, or as its autoscaler can grow it) can ever
run one trial.

``settle`` and ``check_fits`` are pure functions of the spec's values and a ``Cluster`` view;
``read_cluster`` is the one place that asks Ray what the cluster has.

Why each rule (Ray 2.60, torch 2.13):
- A trial that reserves no GPU trains on the CPU, whatever the node has: Ray 2.60 no longer
  hides GPUs from a task that reserved none (ray#54868), so ``device: auto`` would take
  ``cuda:0`` uncounted, next to the trials that did reserve it.
- One worker trains on one device: more than one GPU per worker would be reserved and idle.
- Fractional GPUs with several DDP workers: Ray may give two ranks of one trial the same GPU
  (fractional ids are not unique), both use ``cuda:0`` and NCCL aborts with "Duplicate GPU
  detected" (ray#48012).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuning.config import ResourcesSpec
from tuning.errors import RungwiseError

EPS = 1e-6


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler can add: its resources and how many (-1: no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int = -1


@dataclass(frozen=True)
class Cluster:
    """What the driver knows of the Ray cluster."""

    nodes: tuple[dict[str, float], ...] = ()
    """The resources of each node alive now."""
    autoscaler: bool = False
    node_types: tuple[NodeType, ...] | None = None
    """What the autoscaler can add; None where it has no autoscaler or they cannot be read."""

    @property
    def gpus(self) -> float:
        return sum(n.get("GPU", 0.0) for n in self.nodes)

    @property
    def can_add_gpus(self) -> bool:
        return any(t.resources.get("GPU", 0) >= 1 and t.max_count != 0
                   for t in self.node_types or ())


@dataclass(frozen=True)
class Settled:
    """The resources every trial of the sweep gets, and the device its workers train on."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    device: str
    """``cpu`` whenever no GPU is reserved; else the spec's ``auto`` or ``cuda``."""

    @property
    def bundle(self) -> dict[str, float]:
        """One worker's reservation."""
        return {"CPU": self.cpus_per_worker,
                **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}

    @property
    def gpu_share(self) -> float:
        """The share of one GPU's memory a trial may use (0: a whole card, or none)."""
        return self.gpus_per_worker if 0 < self.gpus_per_worker < 1 else 0.0

    def overrides(self) -> dict[str, Any]:
        """What the trials' spec must say so that every trial sees the settled values."""
        return {"resources.gpus_per_worker": self.gpus_per_worker, "train.device": self.device}


def settle(resources: ResourcesSpec, device: str, cluster: Cluster) -> Settled:
    """``resources.*`` and ``train.device`` made consistent, or a one-line error."""
    gpus = _gpus_per_worker(resources.gpus_per_worker, device, cluster)
    workers = int(resources.workers_per_trial)
    if gpus > 1:
        raise RungwiseError(
            f"resources.gpus_per_worker: {gpus:g}: one worker trains on one GPU, the others "
            "would be reserved and idle; for more GPUs per trial raise "
            "resources.workers_per_trial (DDP, one GPU per worker)")
    if 0 < gpus < 1 and workers > 1:
        raise RungwiseError(
            f"resources.gpus_per_worker: {gpus:g} with resources.workers_per_trial: {workers}: "
            "Ray may give two DDP workers of a trial the same GPU, and NCCL then aborts "
            "(\"Duplicate GPU detected\", ray#48012); use gpus_per_worker: 1 for DDP, or "
            "workers_per_trial: 1 to share GPUs between trials")
    if device == "cuda" and gpus == 0:
        why = ("resources.gpus_per_worker: 0 reserves none"
               if resources.gpus_per_worker != "auto" else
               "the Ray cluster has no GPU and no node type its autoscaler can add has one")
        raise RungwiseError(f"train.device: cuda needs a GPU per worker, but {why}; set "
                            "resources.gpus_per_worker (1, or a fraction), or train.device: "
                            "auto or cpu")
    return Settled(workers=workers, cpus_per_worker=float(resources.cpus_per_worker),
                   gpus_per_worker=gpus, device="cpu" if gpus == 0 else device)


def _gpus_per_worker(value: str | float, device: str, cluster: Cluster) -> float:
    if value == "auto":
        has = cluster.gpus >= 1 or cluster.can_add_gpus
        return 1.0 if has and device != "cpu" else 0.0
    gpus = float(value)
    if device == "cpu" and gpus > 0:
        raise RungwiseError(
            f"resources.gpus_per_worker: {gpus:g} reserves a GPU that train.device: cpu never "
            "uses; set resources.gpus_per_worker: 0 (or auto), or train.device: auto")
    return gpus


def check_fits(settled: Settled, cluster: Cluster) -> str | None:
    """None when a node alive now fits one trial; a note when the autoscaler must add a node
    first (the trials wait for it); a one-line error when no node ever could."""
    bundle, workers = settled.bundle, settled.workers
    if _slots(bundle, [(n, 1) for n in cluster.nodes]) >= workers:
        return None
    types = cluster.node_types or ()
    # a node that the autoscaler added counts within its type's max_count, not on top of it
    fixed = [n for n in cluster.nodes if not any(_same(n, t.resources) for t in types)]
    grown = _slots(bundle, [(n, 1) for n in fixed] + [(t.resources, t.max_count) for t in types])
    need = (f"one trial needs {workers} x ({_fmt(bundle)})" if workers > 1 else
            f"one trial needs {_fmt(bundle)}")
    if cluster.autoscaler and cluster.node_types is None:
        return (f"rungwise: no node of the Ray cluster fits a trial now ({need}); the trials "
                "wait for the autoscaler to add a node (its node types cannot be read from "
                "here: if none fits, stop the sweep)")
    if cluster.autoscaler and grown >= workers:
        fit = [t.name for t in types if _slots(bundle, [(t.resources, 1)]) >= 1]
        return (f"rungwise: no node of the Ray cluster fits a trial now ({need}); the trials "
                f"wait for the autoscaler to add a node ({', '.join(fit)})")
    have = _fmt({k: sum(n.get(k, 0.0) for n in cluster.nodes) for k in ("CPU", "GPU")})
    grow = (f", nor can the nodes its autoscaler may add "
            f"({'; '.join(_fmt_type(t) for t in types) or 'none'})"
            if cluster.autoscaler else "")
    raise RungwiseError(
        f"resources: {need}, but the Ray cluster's nodes cannot hold it ({have} in all)"
        f"{grow}; lower "
        "resources.workers_per_trial / cpus_per_worker / gpus_per_worker")


def _same(node: dict[str, float], kind: dict[str, float]) -> bool:
    return all(abs(node.get(k, 0.0) - kind.get(k, 0.0)) < EPS for k in ("CPU", "GPU"))


def _slots(bundle: dict[str, float], nodes: list[tuple[dict[str, float], int]]) -> float:
    """How many ``bundle`` reservations the nodes hold (count -1: any number of that node)."""
    total = 0.0
    for res, count in nodes:
        per = min(math.floor(res.get(k, 0.0) / v + EPS) for k, v in bundle.items() if v > 0)
        if per > 0 and count != 0:
            total += math.inf if count < 0 else per * count
    return total


def _fmt_type(t: NodeType) -> str:
    most = "" if t.max_count < 0 else f", at most {t.max_count}"
    return f"{t.name}: {_fmt(t.resources)}{most}"


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{res.get(k, 0.0):g} {k}" for k in ("CPU", "GPU")
                     if k == "CPU" or res.get(k, 0.0))


def cap_gpu_memory(share: float, device: Any) -> bool:
    """With a fraction of a GPU, cap this process's CUDA allocations to that share of the
    card's memory (torch's caching allocator then raises OutOfMemoryError beyond it), so
    that one trial cannot starve the others on the card. Call it before the model and the
    data reach the card. True when a cap was set."""
    if not 0 < share < 1 or getattr(device, "type", "") != "cuda":
        return False
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(share, index)
    return True


# --- what Ray says (the only part of this module that talks to Ray) ---------------------


def read_cluster() -> Cluster:
    """The alive nodes, and the node types the autoscaler can add where they can be read:
    from the cluster config the autoscaler reported to the GCS, else from the autoscaling
    config file the head's monitor was started with (``ray start --autoscaling-config``,
    the cluster launcher), when this driver runs on the head. On KubeRay the autoscaler is
    a side container whose config is not visible here: present, node types unknown."""
    import ray

    nodes = tuple({k: float(v) for k, v in n["Resources"].items()}
                  for n in ray.nodes() if n.get("Alive"))
    types = _reported_node_types()
    config = None if types is not None else _monitor_config(
        ray.get_runtime_context().gcs_address)
    if config is not None:
        types = node_types_of(config)
    kuberay = os.environ.get("RAY_USAGE_STATS_KUBERAY_IN_USE") == "1"
    return Cluster(nodes=nodes, autoscaler=types is not None or config is not None or kuberay,
                   node_types=tuple(types) if types is not None else None)


def _reported_node_types() -> list[NodeType] | None:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older GCS, or none reported
        return None
    if config is None or not config.node_group_configs:
        return None
    return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
            for g in config.node_group_configs]


def _monitor_config(gcs_address: str) -> Path | None:
    """The autoscaling config named on the command line of the monitor process serving
    ``gcs_address`` on this machine (Linux /proc), or None."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in args) or \
                f"--gcs-address={gcs_address}" not in args:
            continue
        paths = [a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")]
        return Path(paths[0]).expanduser() if paths else None
    return None


def node_types_of(path: Path) -> list[NodeType] | None:
    """The worker node types of a Ray autoscaling config (YAML or JSON); None where it has
    none, or where a type leaves its resources to be read off the instance type."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        return None
    head = config.get("head_node_type")
    workers = {n: t for n, t in config["available_node_types"].items() if n != head}
    if any(not (t or {}).get("resources") for t in workers.values()):
        return None  # resources filled in from the instance type by the autoscaler: unknown
    return [NodeType(name, {k: float(v) for k, v in t["resources"].items()},
                     int(t.get("max_workers", config.get("max_workers", -1))))
            for name, t in workers.items()]
