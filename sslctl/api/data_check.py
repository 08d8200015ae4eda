"""``sslctl data check``: decode-test every image of a data set once and cache the clean index."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sslctl import UserError
from sslctl.data.index import KINDS, USABLE, build_index, index_path
from sslctl.data.readers import Skipped, read_list_file, scan_imagefolder


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
    # (symlink loops) and FIFOs/sockets/devices named like images (opening one can block)
    skipped: Skipped = field(default_factory=Skipped)


def data_check(
    root: Path,
    list_file: Path | None = None,
    threads: int | None = None,
    rescan: bool = False,
) -> DataCheckResult:
    """Scan ``root`` (an ImageFolder tree, or the files a list file names under it), decode
    every new or changed image, classify it, and write the index pre-training uses.

    The index is cached under ``index_path(root, list_file)``: pre-training with the same
    --data (and data.list_file) finds it and re-checks only files that changed since.
    """
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    skipped = Skipped()
    if list_file is not None:
        lst = list_file if list_file.is_absolute() else root / list_file
        samples = read_list_file(lst, root, skipped)
    else:
        lst = None
        samples, _ = scan_imagefolder(root, skipped)
    cache = index_path(root, lst or "")
    built = build_index([p for p, _ in samples], root, cache, threads=threads, rescan=rescan)
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
    return "used" if kind in USABLE else "skipped (the next image is used instead)"
