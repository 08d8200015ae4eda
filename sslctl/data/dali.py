"""The DALI backend's pre-training loader: the same two views rendered by NVIDIA DALI.

Decoding runs on the GPU (nvJPEG, ``device="mixed"``) when one is used, otherwise on the CPU;
every later operation runs where the decoded image is.

Design (why it looks like this):
- Randomness is drawn in Python, per sample, by the backends' shared ``draws.draw_params``
  from ``sample_rng(seed, epoch, index)``; DALI only renders the drawn parameters. So both
  backends see the same crops, flips, jitter factors and coin flips for the same sample, a
  resumed epoch renders exactly the views an uninterrupted one would, and thread counts or
  prefetching cannot change anything. Crop boxes need the image size before decoding: the
  preflight index (``sslctl.data.index``) records it.
- Files reach DALI through ``external_source`` (encoded bytes read by a thread pool), in an
  order built in Python from (seed, epoch) exactly like the torchvision backend's
  ``DistributedSampler(drop_last=True)``: same samples per rank, same epoch length.
- Unusable files (per the index) are never read: like the torchvision backend, the sample is
  replaced by the next usable one (index+1, +2, …) with views still seeded by the original
  index, and counted. A file that fails in DALI anyway (changed after the index was built) is
  found by decoding the failed batch's files one by one, skipped, and the epoch continues.

Rendering (units, where DALI differs from torchvision): ``sslctl.data.dali_graph``; running a
pipeline and feeding it: ``sslctl.data.dali_runner``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from rich.markup import escape
from torch import Tensor
from torch.utils.data import DistributedSampler

from sslctl import UserError, log
from sslctl.data.dali_graph import pretrain_graph, view_arrays
from sslctl.data.dali_runner import (
    Ahead,
    DaliOptions,
    Inline,
    Runner,
    dali_decode_failures,
    read_file,
)
from sslctl.data.draws import ViewParams, draw_params, sample_rng
from sslctl.data.index import ImageIndex
from sslctl.data.loader import steps_per_epoch
from sslctl.data.readers import Sample
from sslctl.data.views import ViewSpec


def _order(n: int, rank: int, world: int, seed: int, epoch: int) -> list[int]:
    """The rank's sample indices of ``epoch``: DistributedSampler(shuffle, drop_last) — the
    torchvision backend's sampler, so both backends visit the same samples in the same order."""
    sampler: DistributedSampler[int] = DistributedSampler(
        range(n),  # type: ignore[arg-type]
        num_replicas=world,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def _next_usable(usable: np.ndarray) -> np.ndarray:
    """For every index, the first usable index at or after it (cyclically)."""
    good = np.flatnonzero(usable)
    if len(good) == 0:
        return np.full(len(usable), -1, np.int64)
    pos = np.searchsorted(good, np.arange(len(usable)))
    return good[np.where(pos == len(good), 0, pos)].astype(np.int64)


class DaliPretrainLoader:
    """Batches of two views for one rank: the torchvision backend's PretrainLoader interface
    (``steps_per_epoch``, ``indices(epoch)``, ``epoch(epoch, start_batch)``, ``substituted``)
    and its sample order, epoch length and per-sample parameters, rendered by DALI.

    ``index`` must be the index of ``samples`` (same files, same order). ``last_indices``
    holds the sample indices of the batch last yielded (as DALI returned them).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        spec_pair: tuple[ViewSpec, ViewSpec],
        batch_size: int,
        index: ImageIndex,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        options: DaliOptions = DaliOptions(),
    ):
        if len(index) != len(samples):
            raise ValueError(f"index has {len(index)} files, the sample list {len(samples)}")
        self.paths = [p for p, _ in samples]
        self.specs, self.batch_size = spec_pair, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.index = index
        self.usable = index.usable().copy()
        if not self.usable.any():
            raise UserError(f"none of the {len(samples)} images can be decoded ({samples[0][0]}…)")
        self.subst = _next_usable(self.usable)
        self.steps_per_epoch = steps_per_epoch(len(samples), batch_size, rank, world)
        self.substituted = 0  # samples replaced by the next usable image, seen by this rank
        self.last_indices: Tensor | None = None
        self._files = ThreadPoolExecutor(max_workers=max(1, options.read_threads))
        self._nhwc = options.gpu if options.channels_last is None else options.channels_last
        self._runner = Runner(pretrain_graph, batch_size, options, specs=spec_pair, nhwc=self._nhwc)

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch`` (steps_per_epoch × batch_size of them)."""
        order = _order(len(self.paths), self.rank, self.world, self.seed, epoch)
        return order[: self.steps_per_epoch * self.batch_size]

    def epoch(
        self, epoch: int, start_batch: int = 0, end_batch: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (v1, v2) batches (B×3×H×W, float32, or float16 with options.half) of
        ``epoch`` from micro-batch ``start_batch`` up to ``end_batch`` (default: the epoch's
        end); the remaining batches equal those of an uninterrupted epoch. A caller that will
        stop early says so with ``end_batch``: the pipeline is then consumed to its end and
        reused by the next epoch instead of rebuilt."""
        end = self.steps_per_epoch if end_batch is None else min(end_batch, self.steps_per_epoch)
        if not 0 <= start_batch <= end:
            raise ValueError(f"start_batch {start_batch} outside 0..{end}")
        keys = np.asarray(self.indices(epoch), np.int64)
        b = self.batch_size
        batches = [keys[k * b : (k + 1) * b] for k in range(start_batch, end)]
        make = functools.partial(self._batch, epoch)
        done = 0
        ahead = self._runner.options.feed_ahead
        while done < len(batches):
            self._runner.start(batches[done:], make)
            feed = (
                Ahead(self._runner.next, len(batches) - done, ahead)
                if ahead > 0
                else Inline(self._runner.next)
            )
            try:
                for k in range(done, len(batches)):
                    try:
                        v1, v2, idx = feed.get()
                    except RuntimeError as e:
                        feed.close()
                        self._recover(e)
                        break
                    self.substituted += int(np.count_nonzero(self.subst[batches[k]] != batches[k]))
                    self.last_indices = idx
                    done = k + 1
                    if self._nhwc:  # B×H×W×3 → B×3×H×W with channels_last strides, no copy
                        v1, v2 = v1.permute(0, 3, 1, 2), v2.permute(0, 3, 1, 2)
                    yield v1, v2
            finally:
                feed.close()  # an abandoned epoch (max_steps, a signal) stops the thread too

    def close(self) -> None:
        """Release the pipeline (and its memory); the next epoch builds a new one."""
        self._runner.drop()

    def _batch(self, epoch: int, keys: np.ndarray) -> tuple:
        """The feed's arrays for the samples ``keys``: encoded files (each replaced by the next
        usable one where needed) and both views' parameters, drawn as the torchvision backend
        draws them."""
        sub = self.subst[keys]
        data = list(self._files.map(read_file, [self.paths[i] for i in sub.tolist()]))
        while any(d is None for d in data):  # vanished or unreadable since the index was built
            for i, d in zip(sub.tolist(), data, strict=True):
                if d is None:
                    self._mark_bad(i, "cannot read the file")
            sub = self.subst[keys]
            data = list(self._files.map(read_file, [self.paths[i] for i in sub.tolist()]))
        p1: list[ViewParams] = []
        p2: list[ViewParams] = []
        sizes = zip(self.index.width[sub].tolist(), self.index.height[sub].tolist(), strict=True)
        for key, (w, h) in zip(keys.tolist(), sizes, strict=True):
            rng = sample_rng(self.seed, epoch, key)
            p1.append(draw_params(w, h, self.specs[0], rng))
            p2.append(draw_params(w, h, self.specs[1], rng))
        v1 = view_arrays(p1, self.specs[0])
        v2 = view_arrays(p2, self.specs[1])
        return (data, *v1, *v2, keys.astype(np.int64))

    def _mark_bad(self, i: int, reason: str) -> None:
        self.usable[i] = False
        self.subst = _next_usable(self.usable)
        msg = escape(f"{self.paths[i]}: {reason}; using the next image instead")
        log.console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True)
        if not self.usable.any():
            raise UserError(f"none of the {len(self.paths)} images can be decoded")

    def _recover(self, err: RuntimeError) -> None:
        """After DALI failed on a batch: find the files it cannot decode among those it was
        given, skip them from now on, or re-raise when none of them is at fault."""
        pending = self._runner.pending()
        self._runner.drop()
        rows = sorted({int(i) for b in pending for i in self.subst[b].tolist()})
        o = self._runner.options  # probe on the decoder that failed (nvJPEG on a GPU)
        failures = dali_decode_failures([self.paths[i] for i in rows], o.gpu, o.device_id)
        if not failures:
            raise err
        for i in rows:
            if self.paths[i] in failures:
                self._mark_bad(i, f"DALI cannot decode it: {failures[self.paths[i]]}")
