"""Run under torchrun by tests/test_losses_baselines.py: NT-Xent with negatives gathered over
2 gloo ranks. Every rank builds the same seeded fp64 batch, takes its slice, and saves its loss
and the gradients of its local rows."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sslctl import dist
from sslctl.losses import nt_xent

WORLD = 2
N_LOCAL = 3
DIM = 5
TAU = 0.3


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch (WORLD·N_LOCAL images), identical on every rank and in the test."""
    g = torch.Generator().manual_seed(1234)
    z1 = torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64)
    z2 = torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64)
    return z1, z2


def main() -> None:
    out = Path(sys.argv[1])
    di = dist.init("cpu")
    assert di.world_size == WORLD, di
    z1, z2 = full_batch()
    rows = slice(di.rank * N_LOCAL, (di.rank + 1) * N_LOCAL)
    a = z1[rows].clone().requires_grad_()
    b = z2[rows].clone().requires_grad_()
    loss = nt_xent(a, b, TAU, gather=dist.gather_with_grad, rank=dist.rank())
    loss.backward()
    assert a.grad is not None and b.grad is not None
    torch.save({"loss": loss.detach(), "g1": a.grad, "g2": b.grad}, out / f"rank{di.rank}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main()
