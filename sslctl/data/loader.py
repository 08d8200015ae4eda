"""What a pre-training loader is to the engine (``TwoViewLoader``), and its epoch geometry.

Both data backends (``tv.PretrainLoader``, ``dali.DaliPretrainLoader``) and the engine tests'
in-memory loader satisfy ``TwoViewLoader``; ``steps_per_epoch`` is the one check of how many
batches a rank gets, shared by both backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from sslctl import UserError

if TYPE_CHECKING:
    from torch import Tensor


class TwoViewLoader(Protocol):
    """Batches of two views for one rank, as the training loop reads them."""

    steps_per_epoch: int  # micro-batches per epoch on this rank (the last partial one dropped)

    def epoch(
        self, epoch: int, start_batch: int = 0, end_batch: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(view 1, view 2) batches of ``epoch`` from micro-batch ``start_batch`` up to
        ``end_batch`` (default: the epoch's end), equal to those of an uninterrupted epoch."""
        ...


def steps_per_epoch(n: int, batch_size: int, rank: int = 0, world: int = 1) -> int:
    """Full batches per epoch for one of ``world`` ranks over ``n`` samples, with
    DistributedSampler(drop_last=True) semantics: ``n // world`` samples per rank. Fewer than
    one batch is a UserError saying what to change."""
    if batch_size < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad loader geometry: batch {batch_size}, rank {rank}, world {world}")
    per_rank = n // world
    if per_rank < batch_size:
        raise UserError(
            f"{n} images over {world} rank(s) give {per_rank} per rank, fewer than one batch of "
            f"{batch_size}: use more images, a smaller train.batch_size or fewer GPUs"
        )
    return per_rank // batch_size
