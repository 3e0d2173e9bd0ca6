"""Resources settled once (tuning/resources.py): pure functions, table-tested, no Ray."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.arrays import ArrayData
from trainer.config import ModelSpec, TrainSpec
from trainer.models import explain_oom
from trainer.run import data_bytes
from tuning.config import ResourcesSpec
from tuning.errors import RungwiseError
from tuning.resources import (
    Cluster,
    NodeType,
    Settled,
    cap_gpu_memory,
    check_fits,
    node_types_of,
    settle,
)

CPU4 = {"CPU": 4.0}
GPU1 = {"CPU": 8.0, "GPU": 1.0}
GPU2 = {"CPU": 8.0, "GPU": 2.0}
NO_GPU = Cluster(nodes=(CPU4,))
ONE_GPU = Cluster(nodes=(CPU4, GPU1))
# KubeRay / cluster launcher: a head of 0 CPU / 0 GPU and nothing else until the autoscaler acts
EMPTY_HEAD = {"CPU": 0.0, "GPU": 0.0}
GROWS = Cluster(nodes=(EMPTY_HEAD,), autoscaler=True,
                node_types=(NodeType("gpu_node", {"CPU": 2.0, "GPU": 1.0}, 4),))
GROWS_CPU_ONLY = Cluster(nodes=(EMPTY_HEAD,), autoscaler=True,
                         node_types=(NodeType("cpu_node", {"CPU": 8.0}, -1),))
GROWS_UNKNOWN = Cluster(nodes=(EMPTY_HEAD,), autoscaler=True, node_types=None)


def res(gpus: str | float = "auto", workers: int = 1, cpus: float = 1.0) -> ResourcesSpec:
    return ResourcesSpec(gpus_per_worker=gpus, workers_per_trial=workers, cpus_per_worker=cpus)


@pytest.mark.parametrize(("gpus", "workers", "device", "cluster", "want_gpus", "want_device"), [
    ("auto", 1, "auto", NO_GPU, 0.0, "cpu"),          # no GPU anywhere: CPU
    ("auto", 1, "auto", ONE_GPU, 1.0, "auto"),        # a GPU: one per worker
    ("auto", 1, "cpu", ONE_GPU, 0.0, "cpu"),          # device cpu reserves none
    ("auto", 2, "auto", ONE_GPU, 1.0, "auto"),        # DDP: one GPU per rank
    ("auto", 1, "auto", GROWS, 1.0, "auto"),          # the autoscaler can add a GPU node
    ("auto", 1, "auto", GROWS_CPU_ONLY, 0.0, "cpu"),  # ... only CPU nodes
    ("auto", 1, "auto", GROWS_UNKNOWN, 0.0, "cpu"),   # ... unknown types: no GPU assumed
    ("auto", 1, "cuda", ONE_GPU, 1.0, "cuda"),
    (0, 1, "auto", ONE_GPU, 0.0, "cpu"),              # 0 reserved: CPU, whatever the node has
    (0.0, 3, "auto", ONE_GPU, 0.0, "cpu"),
    (1, 1, "auto", NO_GPU, 1.0, "auto"),              # explicit: kept (check_fits judges it)
    (0.25, 1, "auto", ONE_GPU, 0.25, "auto"),         # fractions pack single-worker trials
    (0.5, 1, "cuda", ONE_GPU, 0.5, "cuda"),
    (1.0, 4, "cuda", ONE_GPU, 1.0, "cuda"),
])
def test_settle_table(gpus, workers, device, cluster, want_gpus, want_device) -> None:
    s = settle(res(gpus, workers), device, cluster)
    assert (s.gpus_per_worker, s.device, s.workers) == (want_gpus, want_device, workers)
    assert s.overrides() == {"resources.gpus_per_worker": want_gpus, "train.device": want_device}


@pytest.mark.parametrize(("gpus", "workers", "device", "cluster", "message"), [
    (2, 1, "auto", Cluster(nodes=(GPU2,)),
     r"^resources\.gpus_per_worker: 2: one worker trains on one GPU.*raise "
     r"resources\.workers_per_trial"),
    (0.5, 2, "auto", ONE_GPU,
     r"^resources\.gpus_per_worker: 0\.5 with resources\.workers_per_trial: 2: Ray may give "
     r"two DDP workers.*Duplicate GPU detected.*ray#48012"),
    (0, 1, "cuda", ONE_GPU,
     r"^train\.device: cuda needs a GPU per worker, but resources\.gpus_per_worker: 0 reserves"),
    ("auto", 1, "cuda", NO_GPU,
     r"^train\.device: cuda needs a GPU per worker, but the Ray cluster has no GPU"),
    (1, 1, "cpu", ONE_GPU,
     r"^resources\.gpus_per_worker: 1 reserves a GPU that train\.device: cpu never uses"),
])
def test_settle_refuses_with_one_line(gpus, workers, device, cluster, message) -> None:
    with pytest.raises(RungwiseError, match=message) as err:
        settle(res(gpus, workers), device, cluster)
    assert "\n" not in str(err.value)


def settled(gpus: float, workers: int = 1, cpus: float = 1.0) -> Settled:
    return Settled(workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus,
                   device="auto" if gpus else "cpu")


@pytest.mark.parametrize(("s", "cluster"), [
    (settled(0), NO_GPU),
    (settled(1), ONE_GPU),
    (settled(0.25), ONE_GPU),
    (settled(1, workers=2), Cluster(nodes=(GPU1, GPU1))),  # DDP ranks on two nodes
    (settled(1, workers=2), Cluster(nodes=(GPU2,))),
    (settled(0, workers=2, cpus=2), Cluster(nodes=(CPU4,))),
    (settled(1), Cluster(nodes=(EMPTY_HEAD, GPU1), autoscaler=True, node_types=())),
])
def test_fits_now(s, cluster) -> None:
    assert check_fits(s, cluster) is None


@pytest.mark.parametrize(("s", "cluster", "note"), [
    (settled(1), GROWS, r"wait for the autoscaler to add a node \(gpu_node\)$"),
    (settled(1, workers=4), GROWS, r"4 x \(1 CPU, 1 GPU\).*\(gpu_node\)$"),
    (settled(0, cpus=4), GROWS_CPU_ONLY, r"needs 4 CPU\).*\(cpu_node\)$"),
    (settled(1), GROWS_UNKNOWN, r"node types cannot be read from here"),
    (settled(1, workers=4), Cluster(nodes=(EMPTY_HEAD, {"CPU": 2.0, "GPU": 1.0}),
                                    autoscaler=True, node_types=GROWS.node_types),
     r"\(gpu_node\)$"),
])
def test_queued_for_the_autoscaler(s, cluster, note) -> None:
    out = check_fits(s, cluster)
    assert out is not None and "\n" not in out
    assert out.startswith("rungwise: no node of the Ray cluster fits a trial now")
    assert re.search(note, out), out


@pytest.mark.parametrize(("s", "cluster", "message"), [
    (settled(1), NO_GPU, r"^resources: one trial needs 1 CPU, 1 GPU, but the Ray cluster's "
                         r"nodes cannot hold it \(4 CPU in all\); lower"),
    # 8 CPU in all, but no node has 8: one worker cannot span two nodes
    (settled(0, cpus=8), Cluster(nodes=(CPU4, CPU4)), r"needs 8 CPU, but the Ray cluster's nodes "
                                                       r"cannot hold it \(8 CPU in all\)"),
    (settled(1, workers=2), ONE_GPU, r"needs 2 x \(1 CPU, 1 GPU\)"),
    (settled(2), GROWS, r"needs 1 CPU, 2 GPU.*\(0 CPU in all\), nor can the nodes its "
                        r"autoscaler may add \(gpu_node: 2 CPU, 1 GPU, at most 4\); lower"),
    (settled(1, workers=5), GROWS, r"5 x .*nor can the nodes its autoscaler may add"),  # max 4
    # the node it added already counts within gpu_node's at most 4, not on top of it
    (settled(1, workers=5), Cluster(nodes=(EMPTY_HEAD, {"CPU": 2.0, "GPU": 1.0}),
                                    autoscaler=True, node_types=GROWS.node_types),
     r"needs 5 x .*\(2 CPU, 1 GPU in all\), nor can"),
    (settled(1), GROWS_CPU_ONLY, r"\(cpu_node: 8 CPU\); lower"),
])
def test_never_fits_is_refused(s, cluster, message) -> None:
    with pytest.raises(RungwiseError, match=message) as err:
        check_fits(s, cluster)
    assert "\n" not in str(err.value)


def test_node_types_of_an_autoscaling_config(tmp_path: Path) -> None:
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("max_workers: 3\nhead_node_type: head\navailable_node_types:\n"
                   "  head: {resources: {CPU: 0, GPU: 0}, max_workers: 0, node_config: {}}\n"
                   "  gpu: {resources: {CPU: 4, GPU: 1}, max_workers: 2, node_config: {}}\n"
                   "  cpu: {resources: {CPU: 16}, node_config: {}}\n")
    assert node_types_of(cfg) == [NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 2),
                                  NodeType("cpu", {"CPU": 16.0}, 3)]
    # resources left to the instance type (the launcher fills them in): unknown, not "none"
    cfg.write_text("head_node_type: head\navailable_node_types:\n  head: {resources: {}}\n"
                   "  gpu: {node_config: {InstanceType: g5.xlarge}}\n")
    assert node_types_of(cfg) is None
    assert node_types_of(tmp_path / "missing.yaml") is None


def test_fractional_gpu_caps_the_trials_cuda_memory(monkeypatch) -> None:
    calls: list[tuple[float, int]] = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda frac, dev=None: calls.append((frac, dev)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cap_gpu_memory(0.25, torch.device("cuda")) is True
    assert cap_gpu_memory(0.5, torch.device("cuda", 1)) is True
    assert cap_gpu_memory(1.0, torch.device("cuda", 0)) is False  # a whole card: no cap
    assert cap_gpu_memory(0.25, torch.device("cpu")) is False
    assert cap_gpu_memory(0.0, torch.device("cuda", 0)) is False
    assert calls == [(0.25, 0), (0.5, 1)]


def test_oom_message_names_the_share_and_the_data_on_the_card() -> None:
    arrays = ArrayData(*(np.zeros((1024, 256), np.float32), np.zeros(1024, np.int64)) * 3,
                       task="classification", n_classes=2)
    size = data_bytes(arrays)
    assert size == 3 * (1024 * 256 * 4 + 1024 * 8)
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    model, train = ModelSpec(hidden=[64]), TrainSpec(batch_size=512)
    msg = str(explain_oom(exc, model, train, 256, gpu_share=0.25, data_bytes=size))
    assert msg == ("out of memory: train.batch_size=512 is the likely cause; lower it and retry; "
                   "or raise resources.gpus_per_worker: this trial may use only 25% of the "
                   "GPU's memory (gpus_per_worker: 0.25) and its data takes 3.0 MiB of it on "
                   "the card (CUDA out of memory. Tried to allocate 2.00 GiB)")
    whole = str(explain_oom(exc, model, train, 256, gpu_share=1.0, data_bytes=size))
    assert whole == ("out of memory: train.batch_size=512 is the likely cause; lower it and "
                     "retry (CUDA out of memory. Tried to allocate 2.00 GiB)")
