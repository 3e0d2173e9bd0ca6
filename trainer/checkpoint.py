"""Training checkpoints as files: plain dicts of tensors, numbers, strings, lists and dicts.

``fit`` hands its checkpoints to a callback as such dicts; these two functions put one on
disk and read it back. Loading uses ``torch.load(weights_only=True)`` only, so a file that
holds any other pickled object is refused instead of executed.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from trainer.errors import RungwiseError

PLAIN = (int, float, str, bool, type(None), torch.Tensor, torch.dtype, torch.device)


class CheckpointError(RungwiseError):
    """A checkpoint that cannot be written or read safely; the message is one line."""


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` naming the first value ``weights_only`` could not load."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise CheckpointError(f"{where}: keys must be str or int, got {key!r}")
            check_plain(value, f"{where}.{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, PLAIN):
        raise CheckpointError(f"{where}: {type(obj).__name__} is not allowed in a checkpoint "
                              "(tensors, numbers, strings, lists and dicts only)")


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``ckpt`` atomically (a temporary file, then rename) and return the path."""
    check_plain(ckpt)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; never unpickles arbitrary objects."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint not found: {source}")
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{source}: refused to load: it holds objects other than "
                              f"tensors and plain data ({first})") from None
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{source}: not a readable torch checkpoint: "
                              f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source}: a checkpoint is a dict, got {type(ckpt).__name__}")
    return ckpt


def make_checkpoint(net: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    generator: torch.Generator, progress: dict[str, Any]) -> dict[str, Any]:
    """A CPU copy of everything a resumed run needs; ``progress`` is the loop's bookkeeping.

    The model is the unwrapped module (no DDP ``module.`` prefix). RNG states are uint8
    tensors: the shuffle generator's, the global CPU one (dropout) and CUDA's if used.
    """
    device = next(net.parameters()).device
    return copy_tensors({
        "model": net.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        **progress,
        "rng": generator.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }, torch.device("cpu"))


def restore_checkpoint(ckpt: dict[str, Any], net: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, scheduler: Any,
                       generator: torch.Generator) -> dict[str, Any]:
    """Load ``make_checkpoint``'s states back in place; returns the remaining entries."""
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    generator.set_state(ckpt["rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    device = next(net.parameters()).device
    if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    skip = {"model", "optimizer", "scheduler", "rng", "torch_rng", "cuda_rng"}
    return {k: copy_tensors(v, device) for k, v in ckpt.items() if k not in skip}


def copy_tensors(obj: Any, device: torch.device | None = None) -> Any:
    """A deep copy of nested dicts/lists of tensors (moved to ``device``), detached."""
    if torch.is_tensor(obj):
        return obj.detach().to(device or obj.device, copy=True)
    if isinstance(obj, dict):
        return {k: copy_tensors(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(copy_tensors(v, device) for v in obj)
    return obj
