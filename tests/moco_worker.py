"""Run under torchrun by tests/test_methods_baselines.py: MoCo's shuffle-BN over 2 gloo ranks.

Each rank encodes its share of the shuffled global batch with an "encoder" that returns each
sample's own value and the rank that encoded it; the test checks every key came back."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sslctl import dist
from sslctl.methods.mocov2 import shuffled_forward


def main() -> None:
    out = Path(sys.argv[1])
    di = dist.init("cpu")
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(100 + di.rank))

    def encode(t: torch.Tensor) -> torch.Tensor:
        who = torch.full((t.shape[0], 1), float(di.rank))
        return torch.cat([t.flatten(1).sum(1, keepdim=True), who], dim=1)

    keys = shuffled_forward(encode, x, torch.Generator().manual_seed(7))
    torch.save({"x": x, "out": keys}, out / f"rank{di.rank}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main()
