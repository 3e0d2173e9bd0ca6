"""The networks: an MLP for tables (or flattened images) and a small CNN for images.

``build_model`` takes the spec's ``model`` section (``trainer.config.ModelSpec``, which
holds the allowed kinds, activations and pools and checks them) and returns a
plain ``nn.Sequential``, seeded so that the same spec and seed give the same weights.

Initialisation follows the activation: Kaiming/He (uniform, fan-in) for the ReLU family
and softplus, Xavier/Glorot (uniform) for tanh, sigmoid and sign; biases start at zero.

Inference helpers live here too (``predict``, ``predict_proba``, ``forward_batched``): batched,
eval mode, no grad, float32 (training alone uses bf16 autocast, on cards with native bf16);
they unwrap a ``DistributedDataParallel`` model.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.arrays import Shapes
from trainer.config import ACTIVATIONS, ModelSpec, TrainSpec
from trainer.errors import RungwiseError

LEAKY_SLOPE = 0.01
EVAL_BATCH = 8192


class Sign(nn.Module):
    """The perceptron's step, ``torch.sign``: forward only.

    Its gradient is zero almost everywhere, so layers *below* a sign activation never learn
    by backpropagation; only the head after the last sign layer does. It is here to show
    why smooth activations replaced the perceptron's step, not to train deep networks.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x)


def make_activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE)
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "softplus":
        return nn.Softplus()
    if name == "sign":
        return Sign()
    raise ValueError(f"model.activation: unknown activation {name!r}; "
                     f"allowed: {', '.join(ACTIVATIONS)}")


class ModelError(RungwiseError):
    """A model section that does not fit the data; the one-line message names the spec key."""


def build_model(cfg: ModelSpec, input_shape: tuple[int, ...], n_outputs: int,
                seed: int) -> nn.Module:
    """The network for ``input_shape`` (one example, no batch dim) and ``n_outputs``.

    ``n_outputs`` is the number of classes (one logit per class, also for two classes) or 1
    for regression. Building does not touch the global RNG: it runs inside ``fork_rng``.
    """
    shape = tuple(int(s) for s in input_shape)
    if n_outputs < 1:
        raise ValueError(f"n_outputs: must be >= 1 (classes, or 1 for regression), "
                         f"got {n_outputs}")
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"input_shape: one example is (features,), (H, W) or (C, H, W); "
                         f"got {shape}")
    if cfg.kind == "cnn" and len(shape) == 1:
        raise ModelError(f"model.kind: cnn needs image data (an .npz with x of shape (N, H, W) "
                         f"or (N, C, H, W)); this table has {shape[0]} features: use mlp")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body, n_features = _cnn_body(cfg, shape) if cfg.kind == "cnn" else _mlp_body(shape)
        net = nn.Sequential(*body, *_head(cfg, n_features, n_outputs))
        init_weights(net, cfg.activation)
    return net


def _mlp_body(shape: tuple[int, ...]) -> tuple[list[nn.Module], int]:
    """An MLP sees images as flat vectors."""
    return ([nn.Flatten()] if len(shape) > 1 else []), math.prod(shape)


def _cnn_body(cfg: ModelSpec, shape: tuple[int, ...]) -> tuple[list[nn.Module], int]:
    """Conv(same) -> activation -> 2x2 pool per entry of ``channels``, then flatten."""
    layers: list[nn.Module] = []
    if len(shape) == 2:  # (H, W): one channel
        layers.append(nn.Unflatten(1, (1, shape[0])))  # (B, H, W) -> (B, 1, H, W)
        shape = (1, *shape)
    c_in, h, w = shape
    for c_out in cfg.channels:
        layers += [nn.Conv2d(c_in, int(c_out), cfg.kernel_size, padding="same"),
                   make_activation(cfg.activation)]
        if cfg.pool != "none" and min(h, w) >= 2:  # pooling a size-1 map would empty it
            layers.append(nn.MaxPool2d(2) if cfg.pool == "max" else nn.AvgPool2d(2))
            h, w = h // 2, w // 2
        c_in = int(c_out)
    layers.append(nn.Flatten())
    return layers, c_in * h * w


def _head(cfg: ModelSpec, n_in: int, n_outputs: int) -> list[nn.Module]:
    """Linear -> activation -> Dropout per hidden size, then a Linear head (no activation)."""
    layers: list[nn.Module] = []
    for size in cfg.hidden:
        layers += [nn.Linear(n_in, int(size)), make_activation(cfg.activation)]
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        n_in = int(size)
    layers.append(nn.Linear(n_in, n_outputs))
    return layers


def init_weights(net: nn.Module, activation: str) -> None:
    """He init for the ReLU family and softplus, Xavier for tanh/sigmoid/sign; zero biases.

    Draws from the global torch RNG: ``build_model`` calls it inside a seeded ``fork_rng``.
    """
    for module in net.modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        if activation in ("relu", "softplus"):
            nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
        elif activation == "leaky_relu":
            nn.init.kaiming_uniform_(module.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
        else:
            nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- inference -------------------------------------------------------------------------


def forward_batched(model: nn.Module, x: Any, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Outputs for all of ``x`` (array or tensor) in eval mode, without grad; float32."""
    net = unwrap(model)
    device = param_device(net)
    x = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x, dtype=np.float32))
    was_training = net.training
    net.eval()
    with torch.no_grad():  # float32: the metrics are those of the model that is served
        starts = range(0, len(x), batch_size) if len(x) else [0]  # (0, ...) in, (0, out) out
        outs = [net(x[i:i + batch_size].to(device)) for i in starts]
    net.train(was_training)
    return torch.cat(outs).float()


def predict(model: nn.Module, x: Any, y_mean: float = 0.0, y_scale: float = 1.0) -> np.ndarray:
    """Class indices (a network with >= 2 outputs) or de-standardised values (1 output)."""
    out = forward_batched(model, x)
    if out.shape[-1] == 1:
        return (out.squeeze(-1).double() * y_scale + y_mean).cpu().numpy()
    return out.argmax(-1).cpu().numpy()


def predict_proba(model: nn.Module, x: Any) -> np.ndarray:
    """Class probabilities (N, n_classes) of a classification network."""
    out = forward_batched(model, x)
    if out.shape[-1] < 2:
        raise ValueError("predict_proba: this network has one output (regression); "
                         "class probabilities need one output per class")
    return torch.softmax(out, dim=-1).cpu().numpy()


def use_bf16(device: torch.device) -> bool:
    """bf16 autocast for training on CUDA cards with native bf16 (compute capability 8.0+:
    A100, H100, L4, RTX 30xx and later); everything else trains in float32.

    ``torch.cuda.is_bf16_supported()`` says yes on T4 / V100 too, by emulation, which is
    slower than float32 and meets cuDNN convolutions without bf16 kernels; hence
    ``including_emulation=False`` and the capability check."""
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8 and torch.cuda.is_bf16_supported(including_emulation=False)


def precision(device: torch.device) -> str:
    """What training on ``device`` uses: ``bf16-autocast`` or ``fp32`` (logged as a tag)."""
    return "bf16-autocast" if use_bf16(device) else "fp32"


def autocast_context(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    if not enabled:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def new_model(model_spec: ModelSpec, data: Shapes, seed: int) -> torch.nn.Module:
    """The spec's network for ``data`` (a Prepared, ArrayData or TensorData)."""
    return build_model(model_spec, data.input_shape, data.n_outputs, seed=seed)


class OutOfMemory(RungwiseError, RuntimeError):
    """A model or batch that does not fit in memory; the one-line message says which."""


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text
                                           or "out of memory" in text))


def explain_oom(exc: BaseException, model_spec: ModelSpec, train_spec: TrainSpec, n_inputs: int,
                gpu_share: float = 0.0, data_bytes: int = 0) -> OutOfMemory:
    """Name the likely cause: the model's size, else the batch size (``trainer.memory``'s
    estimate, the one that is checked before a run starts); with a share of a GPU
    (``gpu_share``, capped per process), the share and the data's size on the card too."""
    from trainer.memory import estimate, gib

    hidden = list(model_spec.hidden)
    est = estimate(model_spec, train_spec, (n_inputs,), 1)
    where = (f"model.hidden={hidden} needs about {gib(est.weights)} for its weights"
             if est.weights > 2**30 else
             f"train.batch_size={train_spec.batch_size} is the likely cause")
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    share = (f"; or raise resources.gpus_per_worker: this trial may use only {gpu_share:.0%} "
             f"of the GPU's memory (gpus_per_worker: {gpu_share:g}) and its data takes "
             f"{data_bytes / 2**20:.1f} MiB of it on the card" if 0 < gpu_share < 1 else "")
    return OutOfMemory(f"out of memory: {where}; lower it and retry{share} ({first})")
