"""The truncated triplet loss (Wang et al., "Solving Inefficiency of Self-supervised
Representation Learning", ICCV 2021; SPEC §1).

For each online prediction p_i the positive is the target projection of the other view of the
same image; the negatives are every other target projection. The nearest ``drop`` negatives
are skipped (they are likely the same class: the "truncation") and the next ``keep`` are
averaged. The reference ran a Python loop over the anchors; :func:`truncated_triplet_loss` is
one vectorised ``topk`` over the masked distance matrix and equals the loop
(:func:`truncated_triplet_loss_reference`) to float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TripletLossOut:
    """``loss``: scalar with grad; ``d_ap`` / ``d_an``: detached batch means, for logging."""

    loss: torch.Tensor
    d_ap: torch.Tensor
    d_an: torch.Tensor


def min_batch(drop: int, keep: int) -> int:
    """Smallest number of target rows the loss accepts: the positive plus drop + keep negatives."""
    return drop + keep + 1


def _check_inputs(
    p: torch.Tensor, z: torch.Tensor, pos_index: torch.Tensor | None, drop: int, keep: int
) -> None:
    if p.ndim != 2 or z.ndim != 2 or p.shape[1] != z.shape[1]:
        raise ValueError(f"p and z must be n×d and m×d, got {tuple(p.shape)} and {tuple(z.shape)}")
    if drop < 0 or keep < 1:
        raise ValueError(f"need drop >= 0 and keep >= 1, got drop={drop}, keep={keep}")
    n, m = p.shape[0], z.shape[0]
    if m < n:
        raise ValueError(f"z must have at least as many rows as p, got m={m} < n={n}")
    if pos_index is not None and pos_index.shape != (n,):
        raise ValueError(f"pos_index must have shape ({n},), got {tuple(pos_index.shape)}")
    need = min_batch(drop, keep)
    if m < need:
        # users meet the config's check (train.batch_size against loss.keep) before this
        raise ValueError(
            f"the truncated triplet loss needs at least drop+keep+1 = {need} samples (rows of "
            f"z), got {m}"
        )


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    # At least fp32: under fp16 autocast the distances of near-identical unit vectors lose
    # the digits that rank the negatives. float64 stays float64 (used by exactness tests).
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1)


def _distances(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-2·p̂·ẑᵀ (n×m): the squared Euclidean distance of the unit vectors, minus the constant 2."""
    with torch.autocast(device_type=p.device.type, enabled=False):
        return -2.0 * (_unit_rows(p) @ _unit_rows(z).T)


def truncated_triplet_loss(
    p: torch.Tensor,
    z: torch.Tensor,
    pos_index: torch.Tensor | None = None,
    *,
    gamma: float = 2.0,
    margin: float = 100.0,
    drop: int = 1,
    keep: int = 9,
) -> TripletLossOut:
    """Truncated triplet loss of one direction (online view a → target view b).

    Args:
        p: n×d online predictions (normalised here).
        z: m×d target projections (normalised here), m >= n; m > n when negatives are
            gathered across GPUs. Detach it yourself if no gradient should reach it.
        pos_index: LongTensor(n), the row of z that is the positive of each row of p;
            default ``arange(n)`` (z[:n]). With gathered negatives: ``rank * n + arange(n)``.
        gamma: weight of the positive distance.
        margin: hinge margin (100 keeps the hinge active, as in the reference).
        drop: nearest negatives skipped; keep: negatives averaged after them.

    Returns:
        TripletLossOut(loss=mean_i relu(gamma·d_ap(i) − d_an(i) + margin), d_ap, d_an), fp32
        (or float64 for float64 inputs) regardless of autocast.

    Raises:
        ValueError: when m < drop + keep + 1 (batch too small to rank the negatives).
    """
    _check_inputs(p, z, pos_index, drop, keep)
    n = p.shape[0]
    if pos_index is None:
        pos_index = torch.arange(n, device=p.device)
    dist = _distances(p, z)
    col = pos_index.to(device=dist.device, dtype=torch.long).unsqueeze(1)
    d_ap = dist.gather(1, col).squeeze(1)
    # +inf on the positive so that topk(largest=False) ranks negatives only.
    negatives = dist.scatter(1, col, float("inf"))
    nearest = negatives.topk(drop + keep, dim=1, largest=False, sorted=True).values
    d_an = nearest[:, drop:].mean(dim=1)
    loss = F.relu(gamma * d_ap - d_an + margin).mean()
    return TripletLossOut(loss=loss, d_ap=d_ap.detach().mean(), d_an=d_an.detach().mean())


def truncated_triplet_loss_reference(
    p: torch.Tensor,
    z: torch.Tensor,
    pos_index: torch.Tensor | None = None,
    *,
    gamma: float = 2.0,
    margin: float = 100.0,
    drop: int = 1,
    keep: int = 9,
) -> TripletLossOut:
    """The same loss as a plain loop over anchors (one sort per row), as the reference wrote it.

    Slow; kept as the ground truth for tests and the benchmark. Same arguments and result.
    """
    _check_inputs(p, z, pos_index, drop, keep)
    n = p.shape[0]
    positives = list(range(n)) if pos_index is None else [int(i) for i in pos_index]
    p_hat, z_hat = _unit_rows(p), _unit_rows(z)
    hinge, d_aps, d_ans = [], [], []
    for i, pos in enumerate(positives):
        with torch.autocast(device_type=p.device.type, enabled=False):
            row = -2.0 * (z_hat @ p_hat[i])
        d_ap = row[pos]
        others = torch.cat([row[:pos], row[pos + 1 :]])
        d_an = torch.sort(others).values[drop : drop + keep].mean()
        hinge.append(torch.clamp(gamma * d_ap - d_an + margin, min=0.0))
        d_aps.append(d_ap.detach())
        d_ans.append(d_an.detach())
    return TripletLossOut(
        loss=torch.stack(hinge).mean(),
        d_ap=torch.stack(d_aps).mean(),
        d_an=torch.stack(d_ans).mean(),
    )
