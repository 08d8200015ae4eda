"""SimCLR's NT-Xent loss (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, eq. 1): normalised temperature-scaled cross-entropy.

Each of the 2n embeddings of a batch (two views of n images) is an anchor; its positive is the
other view of the same image and every other embedding except itself is a negative. With
negatives gathered across W processes, the anchors stay local and the candidates are the
2·W·n embeddings of every rank; the caller injects the gather (this module makes no
``torch.distributed`` call).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """NT-Xent of the two views, averaged over this process's 2n anchors, a scalar.

    For anchor a with positive p (the other view of the same image) and candidates C (every
    embedding but a itself), loss_a = −log(exp(s_ap/τ) / Σ_{c∈C} exp(s_ac/τ)), where s is the
    cosine similarity. Computed as one (2n)×(2·W·n) logit matrix with the self-similarities
    masked to −inf and ``F.cross_entropy``.

    Args:
        z1: n×d projections of the first view (normalised here).
        z2: n×d projections of the second view of the same n images (normalised here).
        temperature: τ > 0.
        gather: None for a single process (2n − 2 negatives per anchor). Otherwise a
            differentiable callable that concatenates, in rank order along dim 0, the tensor
            every rank passes it (``sslctl.dist.gather_with_grad``): m×c → W·m×c. It is called
            once, on the n×2d tensor [ẑ1 | ẑ2] (the two normalised views side by side), so a
            single collective carries both views; every rank must have the same n.
        rank: this process's index in the gather (0 without gather). The positives of the
            local rows are rows rank·n … rank·n + n − 1 of the gathered other view.

    Returns:
        The mean over the 2n local anchors, fp32 (float64 for float64 inputs) regardless of
        autocast. With gather, the mean of the W ranks' losses is the single-process loss of
        the concatenated batch; ``gather_with_grad`` sums the candidates' gradient over
        ranks, so each rank's input gradient is W times its slice of the single-process
        gradient (DDP's averaging over ranks divides it back).

    Raises:
        ValueError: z1, z2 not both n×d with n, d >= 1; temperature not a finite number > 0;
            fewer than 2 images in all (no negative; n < 2 without gather); rank not in
            [0, W); gather returning a tensor that is not W·n×2d.
    """
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1 or z1.shape[1] < 1:
        raise ValueError(
            f"z1 and z2 must both be n×d with n, d >= 1, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    n, d = z1.shape
    if gather is None:
        if rank != 0:
            raise ValueError(f"rank must be 0 without gather, got {rank}")
        if n < 2:
            raise ValueError(
                f"NT-Xent needs at least 2 images (2n − 2 >= 1 negatives per anchor), got n={n}"
            )
    elif rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        h1 = F.normalize(z1.to(dtype), dim=1)
        h2 = F.normalize(z2.to(dtype), dim=1)
        if gather is None:
            world, g1, g2 = 1, h1, h2
        else:
            both = gather(torch.cat([h1, h2], dim=1))
            if both.ndim != 2 or both.shape[1] != 2 * d or both.shape[0] % n != 0:
                raise ValueError(
                    f"gather must return a W·n×2d = W·{n}×{2 * d} tensor, got {tuple(both.shape)}"
                )
            world = both.shape[0] // n
            if rank >= world:
                raise ValueError(f"rank must be in [0, {world}) for a gather of {world} ranks")
            if world * n < 2:
                raise ValueError("NT-Xent needs at least 2 images in all ranks together, got 1")
            g1, g2 = both[:, :d], both[:, d:]
        anchors = torch.cat([h1, h2], dim=0)  # 2n×d: view 1 rows, then view 2 rows
        candidates = torch.cat([g1, g2], dim=0)  # 2Wn×d: every rank's view 1, then view 2
        logits = anchors @ candidates.T / temperature
        own = torch.arange(n, device=logits.device) + rank * n  # local rows in the gathered view
        self_col = torch.cat([own, own + world * n])
        pos_col = torch.cat([own + world * n, own])
        logits = logits.scatter(1, self_col.unsqueeze(1), float("-inf"))
        return F.cross_entropy(logits, pos_col)
