"""``sslctl data check``: decode-test every image of a data set once and cache the clean index."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sslctl import UserError, as_path
from sslctl.data.index import KINDS, USABLE, build_index, index_path
from sslctl.data.listfile import read_list_file
from sslctl.data.readers import MAX_IMAGE_PIXELS, Skipped, require_dir, scan_imagefolder

# Where this command takes a list file, for the error on a file given as DIR.
LIST_FILE_HINT = "for a list file: sslctl data check ROOT --list-file LIST"


@dataclass(frozen=True)
class DataCheckResult:
    root: Path
    index_path: Path  # the cached index the DALI backend reads (see sslctl.data.index)
    total: int
    usable: int
    counts: dict[str, int]  # files per kind (sslctl.data.index.KINDS), zeros included
    odd: list[tuple[str, str, str]]  # (path, kind, reason) of every file whose kind is not ok
    checked: int  # files decoded now (the others were unchanged since the cached index)
    seconds: float
    # left out by the scan, never in the index: directory links to a folder already read
    # (symlink loops), FIFOs/sockets/devices named like images (opening one can block) and
    # list-file paths too long to name a file
    skipped: Skipped = field(default_factory=Skipped)


def data_check(
    root: str | os.PathLike[str],
    list_file: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    rescan: bool = False,
    *,
    allow_outside_root: bool = False,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> DataCheckResult:
    """Scan ``root`` (an ImageFolder tree, or the files a list file names under it), decode
    every new or changed image, classify it, and write the index pre-training uses.

    The index is cached under ``index_path(root, list_file)``: pre-training with the same
    --data (and data.list_file) finds it and re-checks only files that changed since.
    ``allow_outside_root`` accepts list-file entries outside ``root`` (data.allow_outside_root);
    images over ``max_image_pixels`` are of kind "huge", never decoded (data.max_image_pixels).
    """
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if max_image_pixels < 1:
        raise UserError(
            f"--max-image-pixels must be >= 1 (width × height), got {max_image_pixels:,}"
        )
    root = Path(root)
    list_file = as_path(list_file)
    require_dir(root, "data folder", LIST_FILE_HINT)
    skipped = Skipped()
    if list_file is not None:
        lst = list_file if list_file.is_absolute() else root / list_file
        samples = read_list_file(lst, root, skipped, allow_outside_root=allow_outside_root)
    else:
        lst = None
        samples, _ = scan_imagefolder(root, skipped, hint=LIST_FILE_HINT)
    cache = index_path(root, lst or "")
    paths = [p for p, _ in samples]
    built = build_index(
        paths, root, cache, threads=threads, rescan=rescan, max_image_pixels=max_image_pixels
    )
    idx = built.index
    return DataCheckResult(
        root=root,
        index_path=cache,
        total=len(idx),
        usable=int(idx.usable().sum()),
        counts=idx.counts(),
        odd=idx.files_of([k for k in KINDS if k != "ok"]),
        checked=built.checked,
        seconds=built.seconds,
        skipped=skipped,
    )


def handling(kind: str) -> str:
    """What pre-training does with a file of ``kind``."""
    if kind in USABLE:
        return "used"
    if kind == "multi-frame":
        return "first frame used (torchvision); skipped by DALI"
    if kind == "huge":
        return "skipped, never decoded (over --max-image-pixels)"
    return "skipped (the next image is used instead)"
