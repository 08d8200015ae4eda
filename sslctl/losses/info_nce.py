"""MoCo's InfoNCE loss with a queue of negatives (He et al., "Momentum Contrast for
Unsupervised Visual Representation Learning", CVPR 2020, eq. 1; Chen et al., "Improved
Baselines with Momentum Contrastive Learning", 2020).

Each query's positive is the momentum encoder's key of the other view of the same image; the
negatives are the K keys of earlier batches held in the queue.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def info_nce_queue(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """mean_i −log(exp(q̂_i·k̂_i/τ) / (exp(q̂_i·k̂_i/τ) + Σ_j exp(q̂_i·queue_j/τ))), a scalar.

    The logits are [q̂·k̂ (n×1), q̂·queueᵀ (n×K)] / τ and the target is column 0.

    Args:
        q: n×d queries from the online encoder (normalised here; the gradient flows to q).
        k: n×d keys from the momentum encoder (normalised here). Treated as a constant:
            detached inside, as MoCo's keys get no gradient.
        queue: K×d negatives (K >= 1), already unit rows (the enqueued normalised keys); used
            as given, not normalised here, and detached inside (a constant).
        temperature: τ > 0.

    Returns:
        The mean over the n queries, fp32 (float64 for float64 inputs) regardless of autocast.

    Raises:
        ValueError: q, k not both n×d with n, d >= 1; queue not K×d with K >= 1; temperature
            not a finite number > 0.
    """
    if q.ndim != 2 or q.shape != k.shape or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(
            f"q and k must both be n×d with n, d >= 1, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if queue.ndim != 2 or queue.shape[1] != q.shape[1] or queue.shape[0] < 1:
        raise ValueError(
            f"queue must be K×{q.shape[1]} with K >= 1 (as q is n×{q.shape[1]}), "
            f"got {tuple(queue.shape)}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), queue.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q_hat = F.normalize(q.to(dtype), dim=1)
        k_hat = F.normalize(k.detach().to(dtype), dim=1)
        negatives = queue.detach().to(dtype)
        l_pos = (q_hat * k_hat).sum(dim=1, keepdim=True)
        l_neg = q_hat @ negatives.T
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target)
