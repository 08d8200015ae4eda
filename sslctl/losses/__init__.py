"""Pure loss functions: tensors in, tensors out; no modules, no distributed calls, no state."""

from sslctl.losses.byol import byol_loss
from sslctl.losses.triplet import (
    TripletLossOut,
    min_batch,
    truncated_triplet_loss,
    truncated_triplet_loss_reference,
)

__all__ = [
    "TripletLossOut",
    "byol_loss",
    "min_batch",
    "truncated_triplet_loss",
    "truncated_triplet_loss_reference",
]
