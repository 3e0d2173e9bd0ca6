"""The batched network of a pack: N MLPs of one architecture as one flat ``(N, P)`` tensor.

Row i of ``flat`` holds member i's Linear weights and biases in ``build_model``'s order
(``to_row`` / ``from_row`` convert). Layer l of every member is a view ``(N, out, in)`` of
``flat``, so one ``baddbmm`` runs layer l for all members and one backward fills ``grad``,
``(N, P)``, in place. Member i's loss reaches row i only: a nan in one member stays there.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import make_activation


class PackedMLP:
    """``widths`` = [inputs, *hidden, outputs]; ``size`` members; ``task`` picks the loss."""

    def __init__(self, widths: list[int], activation: str, size: int, device: torch.device,
                 task: str) -> None:
        self.shapes = list(zip(widths[1:], widths[:-1], strict=True))  # (out, in) per layer
        self.device, self.task = device, task
        self.act = make_activation(activation)
        n_params = sum(o * i + o for o, i in self.shapes)
        self.flat = torch.zeros(size, n_params, device=device)  # (N, P): row i = member i
        self.grad = torch.zeros_like(self.flat)
        self.flat.grad = self.grad
        self.params = self._leaves()

    def _leaves(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(W (N, out, in), b (N, out))``: views of ``flat`` that autograd treats
        as leaves, their ``.grad`` views of ``flat.grad``, so one backward accumulates every
        gradient in place into ``flat.grad`` and the optimiser updates ``flat`` in place."""
        out, off = [], 0
        for n_out, n_in in self.shapes:
            views = []
            for numel, shape in ((n_out * n_in, (-1, n_out, n_in)), (n_out, (-1, n_out))):
                t = self.flat[:, off:off + numel].view(shape).requires_grad_()
                t.grad = self.grad[:, off:off + numel].view(shape)
                views.append(t)
                off += numel
            out.append((views[0], views[1]))
        return out

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None) -> torch.Tensor:
        """``x`` (N, B, F) per member or (B, F) shared -> outputs (N, B, outputs)."""
        h, last = x, len(self.params) - 1
        for layer, (w, b) in enumerate(self.params):
            h = torch.matmul(h, w.transpose(1, 2)) + b.unsqueeze(1) if h.dim() == 2 \
                else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if layer < last:
                h = self.act(h)
                if masks is not None:
                    h = h * masks[layer]
        return h

    def masks(self, drops: list[float], gens: list[torch.Generator | None],
              batch: int) -> list[torch.Tensor] | None:
        """Dropout masks ``(N, B, H)`` per hidden layer: member i's rows drawn from
        ``gens[i]`` with probability ``drops[i]``, in fit's order (layer by layer within a
        step, ``bernoulli_(1 - p)`` then ``/ (1 - p)``, as nn.Dropout on a CPU); None when no
        member drops out."""
        if not any(drops):
            return None
        keep = torch.tensor([1 - p for p in drops], device=self.device).view(-1, 1, 1)
        masks = []
        for n_out, _ in self.shapes[:-1]:
            mask = torch.ones(len(drops), batch, n_out, device=self.device)  # (N, B, H)
            for i, (p, gen) in enumerate(zip(drops, gens, strict=True)):
                if p > 0 and gen is not None:
                    mask[i].bernoulli_(1 - p, generator=gen)
            masks.append(mask.div_(keep))
        return masks

    def backward(self, loss: torch.Tensor, max_norm: torch.Tensor | None = None) -> None:
        """``grad`` = d loss_i / d row i for every member (losses ``(N,)``), then clipped per
        member to ``max_norm`` ``(N,)`` as ``clip_grad_norm_`` clips one model."""
        self.grad.zero_()
        with warnings.catch_warnings():  # the leaves' grads are strided views, on purpose
            warnings.filterwarnings("ignore", "grad and param do not obey")
            loss.sum().backward()  # member i's loss reaches member i's row only
        if max_norm is not None:
            coef = (max_norm / (self.grad.norm(dim=1) + 1e-6)).clamp(max=1.0)
            self.grad.mul_(coef.unsqueeze(1))

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """fit's loss per member: cross-entropy or MSE (standardised), mean over the batch."""
        if self.task == "classification":
            per = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
            return per.view(y.shape).mean(1)
        return (out.squeeze(-1) - y).square().mean(1)


def _linears(net: nn.Module) -> list[nn.Linear]:
    return [m for m in net.modules() if isinstance(m, nn.Linear)]


def to_row(net: nn.Module) -> torch.Tensor:
    """A network's Linear weights and biases, in order, as one flat row."""
    return torch.cat([t.detach().reshape(-1) for lin in _linears(net)
                      for t in (lin.weight, lin.bias)])


def from_row(net: nn.Module, row: torch.Tensor) -> None:
    off = 0
    with torch.no_grad():
        for lin in _linears(net):
            for t in (lin.weight, lin.bias):
                t.copy_(row[off:off + t.numel()].view_as(t))
                off += t.numel()
