"""SimSiam's loss (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021,
eq. 1): the negative cosine similarity D(p, z) = −cos(p, stopgrad(z))."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """−mean_i cos(p_i, stopgrad(z_i)), a scalar in [−1, 1].

    SimSiam's symmetric loss is ``(negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2``.

    Args:
        p: n×d predictor outputs (the gradient flows to p).
        z: n×d projections of the other view. Detached inside: the stop-gradient is part of
            SimSiam's definition of D (without it the method collapses), so unlike
            :func:`~sslctl.losses.byol_loss` this function applies it itself.

    Returns:
        The mean over the n rows, fp32 (float64 for float64 inputs) regardless of autocast.

    Raises:
        ValueError: p, z not both n×d with n, d >= 1.
    """
    if p.ndim != 2 or p.shape != z.shape or p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(
            f"p and z must both be n×d with n, d >= 1, got {tuple(p.shape)} and {tuple(z.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(p.dtype, z.dtype), torch.float32)
    with torch.autocast(device_type=p.device.type, enabled=False):
        p_hat = F.normalize(p.to(dtype), dim=1)
        z_hat = F.normalize(z.detach().to(dtype), dim=1)
        return -(p_hat * z_hat).sum(dim=1).mean()
