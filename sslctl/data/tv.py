"""The torchvision backend: two-view pre-training pipeline and evaluation datasets on the CPU.

Speed (SPEC §1): every view is cropped and resized on the PIL image first, so that all later
operations touch only size×size pixels; Gaussian blur is PIL's ``GaussianBlur(radius=σ)`` (the
reference's, about 7× faster than torchvision's 23-tap tensor blur); the conversion to a
normalised float tensor is one fused multiply-add. benchmarks/bench_augment.py measures it.

Reproducibility: each sample's views are drawn (``sslctl.data.draws``) from a
``random.Random`` seeded by (seed, epoch, index), never from a global RNG, so a run resumed
mid-epoch sees the same views and worker count or scheduling cannot change them.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import resource_tracker
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter, ImageOps
from rich.markup import escape
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data.dataloader import _BaseDataLoaderIter
from torchvision import transforms as T

from sslctl import STOP_SIGNALS, UserError
from sslctl.data.draws import Jitter, ViewParams, draw_params, sample_rng
from sslctl.data.loader import steps_per_epoch
from sslctl.data.readers import MAX_IMAGE_PIXELS, DecodeError, Sample, load_rgb, pixel_problem
from sslctl.data.text import quote
from sslctl.data.views import EvalSpec, ViewSpec
from sslctl.log import console

_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_TV_INTERP = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


def ignore_stop_signals(
    worker_id: int, then: Callable[[int], None] | None = None, owner: int | None = None
) -> None:
    """``worker_init_fn`` of every sslctl DataLoader: a worker leaves stopping to its owner.

    Slurm, ``timeout`` and ``kill -TERM -- -PGID`` signal every process of the job, workers
    included. torch's worker SIGTERM handler would exit the worker, and the main process would
    then fail with "DataLoader worker … killed by signal" (from its SIGCHLD handler, at any
    point) instead of checkpointing; a forked worker would also run the main process's stop
    handler for SIGINT/SIGUSR1. So a worker ignores SIGINT and SIGUSR1, and SIGTERM unless it
    comes from ``owner`` (the process that iterates the loader) or its parent: torch and
    multiprocessing end workers that way (a stuck worker at shutdown; every daemonic child at
    interpreter exit, which would otherwise wait for ever). A worker whose owner dies exits by
    itself (torch watches the parent). Replaces torch's C SIGTERM handler, installed before
    this runs. ``then`` is the caller's own worker_init_fn, run afterwards.
    """
    others = [s for s in STOP_SIGNALS if s != signal.SIGTERM]
    for s in others:
        signal.signal(s, signal.SIG_IGN)  # also drops one that came while they were blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, others)
    if hasattr(signal, "sigwaitinfo"):  # Linux (elsewhere torch's handler keeps SIGTERM)
        # SIGTERM stays blocked in this thread and in every thread it starts, so only the
        # watcher takes it, and learns its sender (which a signal handler cannot).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drops one that came before
        threading.Thread(
            target=_exit_on_sigterm_from, args=(owner,), name="sslctl-sigterm", daemon=True
        ).start()
    else:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if then is not None:
        then(worker_id)


def _exit_on_sigterm_from(owner: int | None) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid in (owner, os.getppid()):
            os._exit(0)  # as torch's own handler does for its parent's SIGTERM


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Stop signals wait (blocked, not lost) in this thread; delivered when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes leave stopping to the main process.

    Every worker runs ``ignore_stop_signals`` before the caller's ``worker_init_fn``, and the
    workers are started with the stop signals blocked: a signal that comes between a worker's
    fork and its init function waits and is then dropped there (or taken by its SIGTERM
    watcher), while the main process gets it as soon as the workers are started. A
    "forkserver" server started here keeps them blocked for its whole life, so the process the
    workers are forked from survives the signal too.
    """

    def __init__(
        self, dataset: Dataset, *, worker_init_fn: Callable[[int], None] | None = None, **kw: Any
    ):
        init = functools.partial(ignore_stop_signals, then=worker_init_fn, owner=os.getpid())
        super().__init__(dataset, worker_init_fn=init, **kw)

    def __iter__(self) -> _BaseDataLoaderIter:
        if self.num_workers == 0:
            return super().__iter__()
        ctx = self.multiprocessing_context or multiprocessing
        if ctx.get_start_method() != "fork":
            # Started lazily, the resource tracker would unblock SIGINT/SIGTERM in this thread
            # (CPython's ensure_running) before a forkserver is spawned: start it first.
            resource_tracker.ensure_running()
        with _stop_signals_held():
            return super().__iter__()


def _jitter(img: Image.Image, jitter: Jitter) -> Image.Image:
    order, b, c, s, h = jitter
    for op in order:
        if op == 0 and b != 1.0:
            img = F.adjust_brightness(img, b)
        elif op == 1 and c != 1.0:
            img = F.adjust_contrast(img, c)
        elif op == 2 and s != 1.0:
            img = F.adjust_saturation(img, s)
        elif op == 3 and h != 0.0:
            img = F.adjust_hue(img, h)
    return img


class _Normalize:
    """uint8 HWC PIL image → normalised float32 CHW tensor in one fused multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def __call__(self, img: Image.Image) -> Tensor:
        return self.apply(uint8_chw(img))

    def apply(self, x: Tensor) -> Tensor:
        """uint8 (…×)3×H×W on any device → normalised float32, the same arithmetic everywhere."""
        out = x.to(torch.float32, memory_format=torch.contiguous_format)
        scale, shift = self.scale.to(x.device), self.shift.to(x.device)
        return out.mul_(scale).add_(shift)


def uint8_chw(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def render_view(img: Image.Image, spec: ViewSpec, params: ViewParams) -> Image.Image:
    """Apply one view's drawn parameters to an RGB image; returns a size×size RGB image."""
    out = img.resize((spec.size, spec.size), _PIL_RESAMPLE[spec.interpolation], box=params.box)
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if params.jitter is not None:
        out = _jitter(out, params.jitter)
    if params.gray:
        out = out.convert("L").convert("RGB")  # ITU-R 601 luma, as torchvision's PIL path
    if params.blur_sigma is not None:
        out = out.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
    if params.solarize:
        out = ImageOps.solarize(out, threshold=spec.solarize_threshold)
    return out


class TwoViewTransform:
    """PIL RGB image → (view 1, view 2), each a normalised float32 3×size×size tensor."""

    def __init__(self, spec1: ViewSpec, spec2: ViewSpec, uint8: bool = False):
        self.specs = (spec1, spec2)
        self.norms = (_Normalize(spec1.mean, spec1.std), _Normalize(spec2.mean, spec2.std))
        self.uint8 = uint8  # ship uint8 views; the loader normalises them (on the GPU)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> tuple[Tensor, Tensor]:
        rng = rng if rng is not None else random.Random()
        views = []
        for spec, norm in zip(self.specs, self.norms, strict=True):
            params = draw_params(img.width, img.height, spec, rng)
            view = render_view(img, spec, params)
            views.append(uint8_chw(view) if self.uint8 else norm(view))
        return views[0], views[1]


class PretrainDataset(Dataset):
    """Two views of each sample; an unreadable image is replaced by the next readable one.

    ``item(epoch, index)`` returns (v1, v2, substituted). A file that fails to decode is
    warned about (at most once per file and worker process, with its path) and the sample at
    index+1, index+2, … (mod n) is used instead, with the views still seeded by the original
    (epoch, index), so substitution is deterministic. ``substituted`` lets the loader count
    replacements in the main process, which worker processes cannot report otherwise.
    Images over ``max_image_pixels`` are skipped the same way, never decoded, with one warning
    per process for all of them (the first one's path; ``sslctl data check`` counts them).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: TwoViewTransform,
        seed: int = 0,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ):
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.max_image_pixels = max_image_pixels
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        v1, v2, _ = self.item(0, index)
        return v1, v2

    def item(self, epoch: int, index: int) -> tuple[Tensor, Tensor, bool]:
        n = len(self.samples)
        for offset in range(n):
            path = self.samples[(index + offset) % n][0]
            try:
                img = load_rgb(path, self.max_image_pixels)
            except DecodeError as e:
                self._warn(path, e)
                continue
            v1, v2 = self.transform(img, sample_rng(self.seed, epoch, index))
            return v1, v2, offset > 0
        raise UserError(
            f"none of the {n} images could be decoded (first: {quote(self.samples[0][0])})"
        )

    def _warn(self, path: str, e: DecodeError) -> None:
        """Once per file; once for all the huge ones (there may be thousands)."""
        key = f"kind:{e.kind}" if e.kind else path
        if key in self._warned:
            return
        self._warned.add(key)
        more = (
            "; other images over the limit are skipped without a warning each ('sslctl data "
            "check' counts them)"
            if e.kind
            else ""
        )
        msg = escape(f"{e}; using the next image instead{more}")
        console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True)


def preflight(
    samples: Sequence[Sample],
    full: bool = False,
    threads: int = 8,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Split samples into (readable, [(path, reason)]) before training.

    ``full=False`` parses headers only (PIL's ``verify``; fast: catches missing, zero-byte and
    non-image files, images over ``max_image_pixels``, and PNG checksum errors);
    ``full=True`` decodes every pixel (also catches truncated files; at roughly 1 ms an image
    it is for small or suspicious data sets). Threads overlap file-system latency.
    """

    def check(sample: Sample) -> str:
        try:
            if full:
                load_rgb(sample[0], max_image_pixels)
            else:
                with Image.open(sample[0]) as img:
                    problem = pixel_problem(img.width, img.height, max_image_pixels)
                    if problem:
                        return problem
                    img.verify()
        except DecodeError as e:
            return e.reason
        except Exception as e:  # noqa: BLE001 - any failure to parse a header means unreadable
            return str(e) or type(e).__name__
        return ""

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        reasons = list(pool.map(check, samples))
    good = [s for s, r in zip(samples, reasons, strict=True) if not r]
    bad = [(s[0], r) for s, r in zip(samples, reasons, strict=True) if r]
    return good, bad


class _Keyed(Dataset):
    """Maps the sampler's (epoch, index) keys to PretrainDataset.item: the epoch travels with
    each key, so persistent workers need no state update between epochs."""

    def __init__(self, dataset: PretrainDataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor, bool]:
        return self.dataset.item(*key)


class _KeyList(Sampler[tuple[int, int]]):
    """Yields the keys the loader set for the current epoch (the sampler runs in the main
    process, so replacing ``keys`` between epochs reaches persistent workers too)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class PretrainLoader:
    """Batches of two views for one rank, with DistributedSampler(drop_last=True) semantics.

    Each epoch, the sample indices are shuffled with ``seed + epoch`` (the same permutation on
    every rank), the tail that does not split evenly over ``world`` ranks is dropped, rank r
    takes every world-th index from r, and the rank's last partial batch is dropped. rank and
    world are passed explicitly, so one process needs no torch.distributed.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        spec_pair: tuple[ViewSpec, ViewSpec],
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        workers: int = 0,
        pin_memory: bool = False,
        normalize_on: torch.device | None = None,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ):
        """``normalize_on``: workers ship uint8 views (4× less memory and host→device traffic)
        and each batch is moved there and normalised (a CUDA device in training).
        ``max_image_pixels``: larger images are skipped, never decoded (data.max_image_pixels)."""
        self.samples = list(samples)
        self.steps_per_epoch = steps_per_epoch(len(self.samples), batch_size, rank, world)
        self.batch_size = batch_size
        self.normalize_on = normalize_on
        transform = TwoViewTransform(*spec_pair, uint8=normalize_on is not None)
        self.dataset = PretrainDataset(self.samples, transform, seed, max_image_pixels)
        self.sampler: DistributedSampler[int] = DistributedSampler(
            self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.substituted = 0  # unreadable images replaced so far, seen by this rank
        self._keys = _KeyList()
        self._loader = WorkerLoader(
            _Keyed(self.dataset),
            batch_size=batch_size,
            sampler=self._keys,
            num_workers=workers,
            # pinning needs an accelerator; asking without one only earns a warning per epoch
            pin_memory=pin_memory and torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=workers > 0,
        )

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch`` (steps_per_epoch × batch_size of them)."""
        self.sampler.set_epoch(epoch)
        return list(self.sampler)[: self.steps_per_epoch * self.batch_size]

    def epoch(
        self, epoch: int, start_batch: int = 0, end_batch: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (v1, v2) batches (B×3×H×W float32) of ``epoch`` from micro-batch start_batch
        up to ``end_batch`` (default: the epoch's end; nothing past it is decoded).

        Resuming skips the first start_batch batches by slicing the index list, so nothing is
        decoded twice and the remaining batches equal those of an uninterrupted epoch. Use one
        epoch iterator at a time: starting another resets the (persistent) workers' queue.
        """
        end = self.steps_per_epoch if end_batch is None else min(end_batch, self.steps_per_epoch)
        if not 0 <= start_batch <= end:
            raise ValueError(f"start_batch {start_batch} outside 0..{end}")
        chosen = self.indices(epoch)[start_batch * self.batch_size : end * self.batch_size]
        self._keys.keys = [(epoch, i) for i in chosen]
        norms, dev = self.dataset.transform.norms, self.normalize_on
        for v1, v2, substituted in self._loader:
            self.substituted += int(substituted.sum())
            if dev is not None:
                v1 = norms[0].apply(v1.to(dev, non_blocking=True))
                v2 = norms[1].apply(v2.to(dev, non_blocking=True))
            yield v1, v2


def eval_transform(spec: EvalSpec) -> Callable[[Image.Image], Tensor]:
    """PIL RGB image → normalised float32 3×height×width tensor, following ``spec``."""
    interp = _TV_INTERP[spec.interpolation]
    size = (spec.height, spec.width)
    steps: list[Callable[..., object]]
    if spec.crop == "center":
        steps = [T.Resize(spec.resize, interpolation=interp), T.CenterCrop(size)]
    elif spec.crop == "random":
        steps = [
            T.RandomResizedCrop(size, scale=spec.scale, interpolation=interp),
            T.RandomHorizontalFlip(spec.flip_p),
        ]
    else:
        steps = [T.Resize(size, interpolation=interp)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


class EvalDataset(Dataset):
    """(tensor, label, index) per sample; an unreadable image, or one over
    ``max_image_pixels``, raises DecodeError (evaluation must not silently change its data
    set)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        spec: EvalSpec,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ):
        self.samples = list(samples)
        self.spec = spec
        self.transform = eval_transform(spec)
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path, self.max_image_pixels)), label, index
