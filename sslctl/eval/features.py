"""Dataset-ordered feature extraction, sharded over torchrun processes without padding.

Reusable by every evaluation that needs frozen-backbone features (re-ID, kNN, linear probes on
cached features). The dataset yields ``(image, label, index)``; ``label`` is anything the
default collate turns into a tensor (a class id, or a content hash for re-ID) and is gathered
in the same order as the features.

Sharding: rank r of W takes the contiguous index range [⌊r·n/W⌋, ⌊(r+1)·n/W⌋). Unlike
``DistributedSampler`` nothing is repeated or interleaved (REID.md edge case 11), so
concatenating the ranks' outputs in rank order is the dataset order.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sslctl import UserError, dist, log
from sslctl.data.readers import MAX_IMAGE_PIXELS, Sample
from sslctl.data.tv import EvalDataset, WorkerLoader
from sslctl.data.views import EvalSpec

FUSIONS = ("sum", "legacy-triplet")
PRECISIONS = ("bf16", "fp32")


def auto_precision(device: torch.device, requested: str = "auto") -> str:
    """The forward precision of an extraction: ``requested`` as given, except "auto": bf16
    autocast on CUDA, fp32 anywhere else."""
    if requested != "auto":
        return requested
    return "bf16" if device.type == "cuda" else "fp32"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a Slurm or container limit), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """``requested`` decoding workers, capped at this process's share of the CPUs (a profile's
    8 workers on a 2-core laptop only add start-up time and memory); 0 stays 0 (in-process)."""
    if requested <= 0:
        return 0
    per_process = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(requested, per_process))


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous slice [start, end) of n items; sizes differ by at most one."""
    return n * rank // world, n * (rank + 1) // world


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32 (or oneDNN's bf16) on any device.

    cuDNN convolutions default to TF32 (a 10-bit mantissa), so an "fp32" forward on an Ampere
    or later GPU is not fp32 without this; the re-ID score GEMM needs it too (REID.md §8.4).
    Uses the per-operator ``fp32_precision`` flags (inside the block the legacy
    ``cudnn.allow_tf32`` getter raises, as it does whenever the two APIs disagree) and puts
    the previous values back.
    """
    b: Any = torch.backends  # the per-operator modules are attached at run time (untyped)
    ops = (b.cuda.matmul, b.cudnn.conv, b.mkldnn.matmul, b.mkldnn.conv)
    before = [op.fp32_precision for op in ops]
    try:
        for op in ops:
            op.fp32_precision = "ieee"
        yield
    finally:
        for op, value in zip(ops, before, strict=True):
            op.fp32_precision = value


def _fuse(f: torch.Tensor, f_flip: torch.Tensor | None, fusion: str) -> torch.Tensor:
    """Combine a batch's features with its mirror's (both fp32; the caller L2-normalises).

    ``sum``: f + f_flip, as torchreid and SYSU-30k's supervised script.
    ``legacy-triplet``: normalize(f) + f_flip, as the paper's ``test_sysu_combine.py`` and
    SYSU-30k's self-supervised script: their two-view loop normalises the running sum after
    each view, so the image enters the sum unit-length and its mirror raw.
    """
    if f_flip is None:
        return f
    if fusion == "legacy-triplet":
        return F.normalize(f, dim=1) + f_flip
    return f + f_flip


def _forward(model: nn.Module, x: torch.Tensor, flip: bool, precision: str) -> torch.Tensor:
    """Features of x (and of its horizontal mirror, in the same forward pass), cast to fp32.

    Returns (b, d) without flip and (2b, d) with flip: rows [0, b) plain, [b, 2b) mirrored.
    """
    if flip:
        x = torch.cat([x, x.flip(3)])  # one launch for both views (REID.md §8.7)
    use_amp = precision == "bf16"
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = model(x)
    # GAP output to fp32 before any sum or normalisation: bf16 sums lose low bits.
    return out.float().flatten(1)


def _worker_error(e: UserError) -> UserError:
    """One-line UserError from one re-raised by a DataLoader worker (which wraps a traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return e
    return UserError(re.sub(r"^[\w.]+: ", "", lines[-1]))


def _run_local(
    model: nn.Module,
    loader: DataLoader,
    bounds: tuple[int, int],
    opts: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of this rank's slice, written by index into preallocated tensors."""
    start, end = bounds
    feats: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    device = opts["device"]
    t0, done = time.perf_counter(), 0
    with log.make_progress(opts["progress_desc"], unit="images", plain_every_s=10.0) as bar:
        task = bar.add_task(opts["progress_desc"], total=end - start, stats="")
        for x, y, idx in loader:
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            out = _forward(model, x, opts["flip"], opts["precision"])
            b = x.shape[0]
            f = _fuse(out[:b], out[b:] if opts["flip"] else None, opts["fusion"])
            if opts["normalize"]:
                f = F.normalize(f, dim=1)
            y = torch.as_tensor(y)
            if feats is None or labels is None:
                where = _feature_store(end - start, f.shape[1], device)
                feats = torch.empty((end - start, f.shape[1]), dtype=torch.float32, device=where)
                labels = torch.empty((end - start, *y.shape[1:]), dtype=y.dtype)
            rows = torch.as_tensor(idx, dtype=torch.int64) - start
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= end - start):
                raise RuntimeError(f"dataset yielded index outside this rank's range {bounds}")
            # On the GPU when the shard fits: no per-batch device→host copy (a host sync).
            feats[rows.to(feats.device)] = f.to(feats.device)
            labels[rows] = y
            done += b
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=b, stats=f"{rate:,.0f} img/s")
    if done != end - start:
        raise RuntimeError(f"extracted {done} items, expected {end - start}")
    if feats is None or labels is None:  # an empty shard (more ranks than items)
        feats, labels = torch.empty((0, 0)), torch.empty((0,), dtype=torch.int64)
    return feats, labels


def fits_in_free_memory(nbytes: int, device: torch.device, share: float) -> bool:
    """Whether ``nbytes`` fit in ``share`` of the accelerator's free memory (False on the CPU)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < free * share


def _feature_store(rows: int, dim: int, device: torch.device) -> torch.device:
    """Where a shard's features accumulate: on the accelerator when they fit in a quarter of
    its free memory (the gather may need as much again), else on the host."""
    return device if fits_in_free_memory(rows * dim * 4, device, 0.25) else torch.device("cpu")


def _agree_shapes(
    feats: torch.Tensor, labels: torch.Tensor, bounds: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give an empty shard the feature width and label shape the others have (n < world)."""
    if not dist.is_dist():
        return feats, labels
    # The last rank's range [⌊(W−1)n/W⌋, n) is never empty when n ≥ 1.
    spec = dist.broadcast_object(
        (tuple(feats.shape[1:]), tuple(labels.shape[1:]), labels.dtype),
        src=dist.world_size() - 1,
    )
    fshape: tuple[int, ...] = spec[0]  # type: ignore[index]
    lshape: tuple[int, ...] = spec[1]  # type: ignore[index]
    ldtype: torch.dtype = spec[2]  # type: ignore[index]
    if bounds[0] == bounds[1]:
        feats = torch.empty((0, *fshape), dtype=torch.float32)
        labels = torch.empty((0, *lshape), dtype=ldtype)
    return feats, labels


def _raise_if_any_rank_failed(error: UserError | None, device: torch.device) -> None:
    """All ranks stop together: a decode error on one rank must not leave the others in a gather."""
    flag = torch.tensor([0.0 if error is None else 1.0], device=device)
    if float(dist.all_reduce_max(flag).item()) > 0:
        raise error or UserError(f"feature extraction failed on another rank (not {dist.rank()})")


def extract_features_and_labels(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str,
    precision: str = "fp32",
    flip: bool = False,
    fusion: str = "sum",
    normalize: bool = False,
    workers: int = 0,
    progress_desc: str = "features",
    worker_start: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features n×d fp32, labels n×…) on CPU, in dataset order, on rank 0 (other ranks: empty
    tensors of the same width).

    ``model(x)`` must return pooled features (b×d). With ``flip`` each image's horizontal mirror
    is also encoded and combined by ``fusion`` (see ``_fuse``); ``normalize`` L2-normalises the
    result. ``precision`` "bf16" runs the forward under autocast (features still summed in fp32);
    "fp32" leaves TF32 to the caller's flags (``true_fp32()`` turns it off).
    ``workers`` is capped at the CPUs this process may use (``loader_workers``).
    ``worker_start`` is the DataLoader workers' start method (None: the platform's default).
    Under torchrun each rank encodes a contiguous slice and the slices are gathered to rank 0;
    the total is checked against ``len(dataset)``.
    """
    if fusion not in FUSIONS:
        raise UserError(f"unknown flip fusion '{fusion}' (known: {', '.join(FUSIONS)})")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    device = torch.device(device)
    n = len(dataset)  # type: ignore[arg-type]
    bounds = shard_range(n, dist.rank(), dist.world_size())
    workers = loader_workers(workers)
    loader = WorkerLoader(
        Subset(dataset, range(*bounds)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        # "forkserver"/"spawn" for callers inside a training process that runs DALI threads:
        # forking a multi-threaded process can deadlock the child.
        multiprocessing_context=worker_start if workers > 0 else None,
    )
    opts = dict(
        device=device,
        flip=flip,
        fusion=fusion,
        normalize=normalize,
        precision=precision,
        progress_desc=progress_desc,
    )
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    error: UserError | None = None
    feats, labels = torch.empty((0, 0)), torch.empty((0,), dtype=torch.int64)
    try:
        with torch.inference_mode():
            feats, labels = _run_local(model, loader, bounds, opts)
    except UserError as e:
        error = _worker_error(e)
    _raise_if_any_rank_failed(error, device)
    feats, labels = _agree_shapes(feats, labels, bounds)
    # Only rank 0 receives the whole set; NCCL gathers device tensors, gloo host tensors.
    gdev = device if dist.is_dist() else torch.device("cpu")
    w = dist.world_size()
    counts = [e - s for s, e in (shard_range(n, r, w) for r in range(w))]
    feats = dist.gather_to_main(feats.to(gdev), counts).cpu()
    labels = dist.gather_to_main(labels.to(gdev), counts).cpu()
    if dist.is_main() and feats.shape[0] != n:
        raise RuntimeError(f"gathered {feats.shape[0]} feature rows for {n} dataset items")
    return feats, labels


def extract_features(model: nn.Module, dataset: Dataset, **options: Any) -> torch.Tensor:
    """Features (n×d fp32, CPU, dataset order): ``extract_features_and_labels`` (the same
    keyword ``options``) without the labels."""
    return extract_features_and_labels(model, dataset, **options)[0]


def labelled_features(
    model: nn.Module,
    samples: list[Sample],
    spec: EvalSpec,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, class labels) of labelled images through the evaluation transform ``spec``;
    ``options``: the keyword options of ``extract_features_and_labels``."""
    dataset = EvalDataset(samples, spec, max_image_pixels)
    return extract_features_and_labels(model, dataset, **options)
