"""BYOL's regression loss (Grill et al., NeurIPS 2020, eq. 2): normalised mean squared error."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_i ‖p̂_i − ẑ_i‖² = mean_i (2 − 2·cos(p_i, z_i)), a scalar.

    Args:
        p: n×d online predictions.
        z: n×d target projections (detach them yourself; this function is pure).

    Computed in at least fp32 even under autocast: cosines near 1 are what is being learned.
    """
    if p.ndim != 2 or p.shape != z.shape:
        raise ValueError(f"p and z must both be n×d, got {tuple(p.shape)} and {tuple(z.shape)}")
    dtype = torch.promote_types(p.dtype, torch.float32)
    with torch.autocast(device_type=p.device.type, enabled=False):
        p_hat = F.normalize(p.to(dtype), dim=1)
        z_hat = F.normalize(z.to(dtype), dim=1)
        return (2.0 - 2.0 * (p_hat * z_hat).sum(dim=1)).mean()
