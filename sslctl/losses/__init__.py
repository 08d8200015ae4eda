"""Pure loss functions: tensors in, tensors out; no modules, no distributed calls, no state."""

from sslctl.losses.byol import byol_loss
from sslctl.losses.info_nce import info_nce_queue
from sslctl.losses.negative_cosine import negative_cosine
from sslctl.losses.nt_xent import nt_xent
from sslctl.losses.triplet import (
    TripletLossOut,
    min_batch,
    truncated_triplet_loss,
    truncated_triplet_loss_reference,
)

__all__ = [
    "TripletLossOut",
    "byol_loss",
    "info_nce_queue",
    "min_batch",
    "negative_cosine",
    "nt_xent",
    "truncated_triplet_loss",
    "truncated_triplet_loss_reference",
]
