"""PackedOptimizer, member by member against torch.optim on the same gradients."""

from __future__ import annotations

import pytest
import torch

from trainer.packed_optim import PackedOptimizer

HYPER = [(1e-3, 0.0, 0.9), (3e-2, 1e-2, 0.0), (1e-1, 1e-4, 0.5), (5e-4, 0.3, 0.99)]
STOCK = {"sgd": lambda p, lr, wd, m: torch.optim.SGD([p], lr=lr, weight_decay=wd, momentum=m),
         "adam": lambda p, lr, wd, m: torch.optim.Adam([p], lr=lr, weight_decay=wd),
         "adamw": lambda p, lr, wd, m: torch.optim.AdamW([p], lr=lr, weight_decay=wd)}


def _run(kind: str, steps: int, active_at: list[list[bool]]) -> tuple[torch.Tensor, list]:
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(len(HYPER), 37, generator=gen)
    grads = [torch.randn(len(HYPER), 37, generator=gen) for _ in range(steps)]
    flat = init.clone().requires_grad_(True)
    packed = PackedOptimizer(flat, kind)
    for i, (lr, wd, m) in enumerate(HYPER):
        packed.set_member(i, lr, wd, m)
    singles = [torch.nn.Parameter(init[i].clone()) for i in range(len(HYPER))]
    opts = [STOCK[kind](p, *h) for p, h in zip(singles, HYPER, strict=True)]
    for g, active in zip(grads, active_at, strict=True):
        flat.grad = g.clone()
        packed.step(None if all(active) else torch.tensor(active))
        for i, (p, opt) in enumerate(zip(singles, opts, strict=True)):
            if active[i]:
                p.grad = g[i].clone()
                opt.step()
    return flat.detach(), singles


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_each_member_matches_torch_optim(kind: str) -> None:
    steps = 6
    active_at = [[True] * 4 for _ in range(steps)]
    active_at[2][1] = active_at[3][1] = False  # member 1 sits out two steps
    active_at[4][3] = False
    flat, singles = _run(kind, steps, active_at)
    for i, p in enumerate(singles):
        torch.testing.assert_close(flat[i], p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_inactive_row_is_untouched_and_nan_stays_in_its_row(kind: str) -> None:
    flat = torch.ones(3, 5, requires_grad=True)
    opt = PackedOptimizer(flat, kind)
    for i in range(3):
        opt.set_member(i, 0.1, 0.01, 0.9)
    grad = torch.ones(3, 5)
    grad[1] = float("nan")  # member 1 diverged
    flat.grad = grad
    opt.step(torch.tensor([True, True, False]))
    assert torch.isnan(flat[1]).all()
    assert torch.isfinite(flat[0]).all() and (flat[0] != 1).all()
    assert (flat[2] == 1).all()  # inactive: weights and state as they were
    assert (opt.buf[2] == 0).all() and opt.steps[2] == 0
    opt.set_member(1, 0.1)  # a new member takes the slot: fresh state
    assert (opt.buf[1] == 0).all() and opt.steps[1] == 0


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="train.optimizer: unknown value 'lamb'"):
        PackedOptimizer(torch.zeros(2, 3, requires_grad=True), "lamb")
