"""Which data backend serves pre-training, and building its loader from the config.

``data.backend``:
- ``torchvision``: sslctl.data.tv (DataLoader worker processes, PIL).
- ``dali``: sslctl.data.dali — nvJPEG decoding and augmentation on the GPU when the run uses
  CUDA, DALI's CPU operators otherwise. Needs the ``dali`` extra.
- ``auto`` (default): DALI on the GPU when DALI is installed and the run uses CUDA; otherwise
  torchvision.

Why ``auto`` keeps torchvision on the CPU (benchmarks/bench_data.py: two 224-px views of 384
JPEGs of ~500×375, batch 32, five runs on our 2-core x86_64 sandbox shared with other jobs): per
CPU-second the two CPU paths render about the same number of images — torchvision 49–80
(median 70), DALI CPU 48–76 (median 65), with 1 or 2 workers/threads; the spread is the
machine's load — so DALI is not faster per core. torchvision then wins on the rest: its views
are the reference rendering (HSV hue, random jitter order), it needs no preflight decode of the
whole data set, and its worker processes scaled past one core (up to 1.87 cores busy and 133
img/s with 2 workers) where DALI's CPU threads never did here (at most 1.0 core, 74 img/s).
DALI pays off when decoding and augmentation move to the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sslctl import UserError, dist, log
from sslctl.config import Config
from sslctl.data.listfile import read_list_file
from sslctl.data.readers import MAX_IMAGE_PIXELS, Sample, require_dir, scan_imagefolder
from sslctl.data.text import quote
from sslctl.data.views import ViewSpec, view_pair
from sslctl.dist import DistInfo

if TYPE_CHECKING:
    from sslctl.data.index import ImageIndex
    from sslctl.data.loader import TwoViewLoader

# Where pre-training takes a list file, for the error on a file given as --data.
LIST_FILE_HINT = "for a list file use --set data.list_file=PATH, with --data its root folder"


def data_folder(data: Path) -> Path:
    """Pre-training's ``--data`` (or data.root) checked: a missing folder, or a file where the
    folder is expected (a list file passed as --data), is one line saying what to do."""
    return require_dir(data, "--data", LIST_FILE_HINT)


def read_samples(cfg: Config, root: Path) -> list[Sample]:
    lst = _list_file(cfg, root)
    if lst is not None:
        return read_list_file(lst, root, allow_outside_root=cfg.data.allow_outside_root)
    samples, _ = scan_imagefolder(root, hint=LIST_FILE_HINT)
    return samples


def _list_file(cfg: Config, root: Path) -> Path | None:
    if not cfg.data.list_file:
        return None
    lst = Path(cfg.data.list_file)
    lst = lst if lst.is_absolute() else root / lst
    if not lst.is_file():
        raise UserError(f"data.list_file {quote(lst)}: no such file")
    return lst


def resolve_backend(
    requested: str,
    cuda: bool,
    have_dali: bool | None = None,
    probe: Callable[[], str | None] | None = None,
) -> str:
    """ "torchvision" or "dali" for data.backend ``requested`` (auto | torchvision | dali).

    Asking for DALI without it installed is a one-line UserError saying how to install it.
    ``auto`` on CUDA picks DALI when it is installed and ``probe`` (why DALI cannot run on this
    GPU, or None) finds nothing wrong; otherwise it says once why it keeps torchvision.
    """
    from sslctl.data.dali_graph import dali_available, require_dali

    if requested == "torchvision":
        return "torchvision"
    if requested == "dali":
        require_dali()
        return "dali"
    if requested != "auto":
        raise UserError(f"data.backend {requested!r}: choose auto, torchvision or dali")
    if not cuda:
        return "torchvision"
    if dali_available() if have_dali is None else have_dali:
        problem = probe() if probe is not None else None
        if problem is None:
            return "dali"
        log.warn(
            f"data.backend auto: DALI is installed but cannot decode on this GPU ({problem}); "
            "using the torchvision loader (CPU decoding, far slower here) — install the DALI "
            "build for this CUDA (`pip install 'sslctl[dali-cuda12]'` for a CUDA 12 driver)"
        )
        return "torchvision"
    log.warn(
        "data.backend auto: DALI is not installed, so images are decoded on the CPU by the "
        "torchvision loader (slower end to end than DALI on a GPU, BENCHMARKS.md); "
        "`pip install 'sslctl[dali]'` decodes them on the GPU"
    )
    return "torchvision"


def build_pretrain_loader(cfg: Config, root: Path, di: DistInfo) -> TwoViewLoader:
    """The pre-training loader of the configured backend for this rank."""
    samples = read_samples(cfg, root)
    if not samples:
        raise UserError(
            f"--data {quote(root)}: no images found (expected class folders of .jpg/.png files)"
        )
    specs = view_pair(cfg.data.views, cfg.data.image_size, cfg.data.crop_scale_min)
    cuda = di.device.type == "cuda"

    def probe() -> str | None:
        from sslctl.data.dali_runner import dali_gpu_problem

        return dali_gpu_problem(di.device.index or 0)

    if resolve_backend(cfg.data.backend, cuda, probe=probe) == "dali":
        return _dali_loader(cfg, root, di, samples, specs)
    from sslctl.data.tv import PretrainLoader

    log.info(f"data: torchvision backend, {cfg.data.workers} worker process(es)")
    return PretrainLoader(
        samples,
        specs,
        batch_size=cfg.train.batch_size,
        rank=di.rank,
        world=di.world_size,
        seed=cfg.train.seed,
        workers=cfg.data.workers,
        pin_memory=cfg.data.pin_memory and cuda,
        normalize_on=di.device if cuda else None,  # uint8 over PCIe, normalised on the GPU
        max_image_pixels=cfg.data.max_image_pixels,
    )


# Kinds the DALI backend skips that a user may not expect to lose: warned with a count.
SKIPPED_KINDS = {
    "huge": "image(s) over data.max_image_pixels (never decoded)",
    "multi-frame": "multi-frame image(s) (animated or multi-page)",
}


def prepare_index(
    samples: list[Sample],
    root: Path,
    list_file: Path | None,
    di: DistInfo,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> ImageIndex:
    """The preflight index of ``samples``, built or refreshed once per node: local rank 0
    checks (decoding only new or changed files), the other ranks wait and read its result.
    Huge and multi-frame files (skipped by DALI) get one warning each kind: the count and the
    first one."""
    from sslctl.data.index import build_index, index_path

    cache = index_path(root, list_file or "")
    paths = [p for p, _ in samples]
    limit = max_image_pixels
    built = build_index(paths, root, cache, max_image_pixels=limit) if di.local_rank == 0 else None
    dist.barrier_long()  # the first scan of ImageNet takes longer than a collective's timeout
    if built is None:
        built = build_index(paths, root, cache, verify=False, max_image_pixels=limit)
    index = built.index
    counts = {k: v for k, v in index.counts().items() if v and k != "ok"}
    usable = int(index.usable().sum())
    odd = ", ".join(f"{v:,} {k}" for k, v in counts.items()) or "none"
    log.info(f"data index {cache}: {usable:,} of {len(paths):,} images usable; odd files: {odd}")
    for kind, what in SKIPPED_KINDS.items():
        files = index.files_of([kind]) if counts.get(kind) else []
        if files:
            path, _, why = files[0]
            first = f"{quote(path, 120)}; {quote(why, 120)}"
            log.warn(f"data: {len(files):,} {what}, skipped (first: {first})")
    return index


def _dali_loader(
    cfg: Config, root: Path, di: DistInfo, samples: list[Sample], specs: tuple[ViewSpec, ViewSpec]
) -> TwoViewLoader:
    from sslctl.data.dali import DaliPretrainLoader
    from sslctl.data.dali_runner import DaliOptions

    cuda = di.device.type == "cuda"
    index = prepare_index(
        samples, root, _list_file(cfg, root), di, max_image_pixels=cfg.data.max_image_pixels
    )
    threads = max(1, cfg.data.workers)
    opts = DaliOptions(
        threads=threads,
        gpu=cuda,
        device_id=di.device.index or 0,
        # fp16 views halve the host-to-model traffic; autocast runs the model in fp16 anyway
        half=cuda and cfg.train.precision == "fp16",
        read_threads=min(8, threads),
    )
    where = "nvJPEG decoding and augmentation on the GPU" if cuda else "on the CPU"
    log.info(f"data: DALI backend, {where}, {threads} thread(s)")
    return DaliPretrainLoader(
        samples,
        specs,
        cfg.train.batch_size,
        index,
        rank=di.rank,
        world=di.world_size,
        seed=cfg.train.seed,
        options=opts,
    )
