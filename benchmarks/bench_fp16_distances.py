"""How much the reference's fp16 distances (apex O1) change the truncated triplet loss against
sslctl's fp32 distances: the share of anchors whose kept negatives (ranks 2–10) differ, and the
relative change of the loss, on synthetic pairs (n 196, d 256; positives = a shared base vector
plus noise, 20 batches per noise level). SPEC §1 loss, γ 2, margin 100, drop 1, keep 9.

    python benchmarks/bench_fp16_distances.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslctl.losses.triplet import truncated_triplet_loss


def _kept(d: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    return (
        d.masked_fill(eye, float("inf"))
        .topk(10, dim=1, largest=False)
        .indices[:, 1:]
        .sort(1)
        .values
    )


def main() -> None:
    torch.manual_seed(0)
    n, d = 196, 256
    eye = torch.eye(n, dtype=torch.bool)
    print(f"{'noise':>5} {'anchors, other negatives':>25} {'max rel. loss change':>21}")
    for noise in (0.3, 1.0, 3.0):
        other, change = [], []
        for _ in range(20):
            base = torch.randn(n, d)
            p, z = base + noise * torch.randn(n, d), base + noise * torch.randn(n, d)
            pn, zn = F.normalize(p, dim=1), F.normalize(z, dim=1)
            d32 = -2.0 * (pn @ zn.T)
            # apex O1: the normalised inputs in fp16 and the product rounded to fp16
            d16 = -2.0 * (pn.half().float() @ zn.half().float().T).half().float()
            other.append((_kept(d16, eye) != _kept(d32, eye)).any(1).float().mean().item())
            d_an = d16.masked_fill(eye, float("inf")).topk(10, 1, largest=False).values[:, 1:]
            loss16 = F.relu(2 * d16.diagonal() - d_an.mean(1) + 100).mean().item()
            ref = truncated_triplet_loss(p.double(), z.double()).loss.item()
            change.append(abs(loss16 - ref) / ref)
        print(f"{noise:>5.1f} {100 * sum(other) / len(other):>24.1f}% {max(change):>21.1e}")


if __name__ == "__main__":
    main()
