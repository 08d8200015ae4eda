"""Preflight scan of an image set, cached as an index: which files decode, their size, odd kinds.

Why: DALI's pipeline cannot skip a file it fails to decode — one truncated JPEG stops it with
"Critical error in pipeline". So every file is decoded once here (with PIL, which agrees with
DALI's CPU decoder on every kind tested in tests/test_dali.py), classified, and the result is
cached, so the DALI backend only ever sees files that decode and knows each image's size before
decoding (its crop parameters are drawn in Python, like the torchvision backend's).

Cache: ``index_path(root, list_file)`` = ``<cache>/index/<hash of root and list file>.npz``
(``<cache>`` is $SSLCTL_CACHE, else $XDG_CACHE_HOME/sslctl, else ~/.cache/sslctl), so read-only
data sets work. A file's record is reused while its path, size and mtime are unchanged; new or
changed files are decoded again. The npz holds plain arrays (no pickle). A reused record is
judged again against this call's pixel limit (its width and height are recorded), so changing
``max_image_pixels`` needs no rescan: a file now over it becomes "huge", one now under it is
decoded. A cache folder that cannot be written is one UserError before any decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sslctl.data.readers import (
    MAX_IMAGE_PIXELS,
    NOT_REGULAR,
    frame_count,
    is_special_mode,
    pixel_problem,
)
from sslctl.files import TMP_PREFIX, atomic_write, cache_dir, unwritable_cache

VERSION = 2  # 2: the kinds multi-frame and huge (codes moved)

# Usable kinds first; the index's ``kind`` array holds positions in this tuple.
KINDS = (
    "ok",
    "grayscale",  # 1-channel (or 16-bit) images: decoded to RGB by both backends
    "cmyk",  # CMYK/YCCK JPEGs (ImageNet has 22): converted to RGB by both backends
    "png-named-jpeg",  # PNG content behind a .JPEG name (ImageNet has one)
    "misnamed",  # any other content/extension mismatch of a format both backends read
    # Animated GIF/PNG/WebP, multi-page TIFF (MPO excepted: a camera JPEG, decoded as its first
    # JPEG everywhere): the torchvision backend uses frame 0; DALI skips them, as its decoders'
    # handling of later frames is not checked here.
    "multi-frame",
    "huge",  # over max_image_pixels, read from the header: never decoded, skipped
    "truncated",  # the header parses, the pixel data ends early or is corrupt
    "zero-byte",
    "not-an-image",  # no image format recognised
    "other-format",  # PIL reads it, DALI does not (GIF, ICO, ... behind an image extension)
    "unreadable",  # cannot be stat'ed or opened (permissions, vanished, a FIFO)
)
USABLE = frozenset(KINDS[:5])
KIND_CODE = {k: i for i, k in enumerate(KINDS)}
_DECODED = np.array([KIND_CODE[k] for k in (*KINDS[:5], "multi-frame")])  # pixels were decoded

# PIL format names of the formats DALI decodes (nvImageCodec: JPEG, PNG, BMP, PNM, TIFF, WebP,
# JPEG 2000; MPO is a camera JPEG with extra frames appended, decoded as its first JPEG).
_DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "PPM", "TIFF", "WEBP", "JPEG2000"})
_EXT_FORMATS = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".png": {"PNG"},
    ".bmp": {"BMP"},
    ".ppm": {"PPM"},
    ".pgm": {"PPM"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
    ".webp": {"WEBP"},
}
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_CHUNK = 256  # files per pool task: few enough futures for millions of files


@dataclass(frozen=True)
class Check:
    """The verdict on one file."""

    kind: str
    width: int = 0
    height: int = 0
    reason: str = ""


def _format_kind(path: str, fmt: str, mode: str) -> str:
    """The kind of a file that decoded, from its format, extension and colour mode."""
    if fmt not in _DALI_FORMATS:
        return "other-format"
    expected = _EXT_FORMATS.get(os.path.splitext(path)[1].lower())
    if expected is not None and fmt not in expected:
        return "png-named-jpeg" if fmt == "PNG" and "JPEG" in expected else "misnamed"
    if mode in ("CMYK", "YCCK"):
        return "cmyk"
    if mode in _GRAY_MODES:
        return "grayscale"
    return "ok"


def check_file(path: str, max_image_pixels: int | None = MAX_IMAGE_PIXELS) -> Check:
    """Decode ``path`` fully (truncation shows only then) and classify it; an image over
    ``max_image_pixels`` (None: no limit) is "huge" from its header, never decoded."""
    try:
        st = os.stat(path)
        if is_special_mode(st.st_mode):
            return Check("unreadable", reason=NOT_REGULAR)  # never opened: a FIFO would block
        if st.st_size == 0:
            return Check("zero-byte", reason="empty file")
        fh = open(path, "rb")  # noqa: SIM115 - closed below; open errors are "unreadable"
    except (OSError, ValueError) as e:  # ValueError: a name with a NUL byte
        return Check("unreadable", reason=getattr(e, "strerror", None) or str(e))
    with fh:
        try:
            img = Image.open(fh)
        except UnidentifiedImageError:
            return Check("not-an-image", reason="no image format recognised")
        except Exception as e:  # noqa: BLE001 - e.g. a broken header
            return Check("unreadable", reason=str(e) or type(e).__name__)
        with img:
            w, h, fmt, mode = img.width, img.height, img.format or "", img.mode
            problem = pixel_problem(w, h, max_image_pixels)
            if problem:
                return Check("huge", w, h, problem)
            frames = frame_count(img)
            try:
                img.seek(0)
                img.load()
            except Exception as e:  # noqa: BLE001 - any failure while decoding pixels
                return Check("truncated", w, h, str(e) or type(e).__name__)
    if frames > 1:
        why = f"{frames} frames: the torchvision backend uses the first, DALI skips the file"
        return Check("multi-frame", w, h, why)
    return Check(_format_kind(path, fmt, mode), w, h)


@dataclass(frozen=True)
class ImageIndex:
    """Per-file records, in the order of the path list it was built for.

    ``rel`` are paths relative to ``root`` (absolute for files outside it); the arrays hold
    the file size, mtime (ns), kind code (position in KINDS) and image width/height.
    """

    root: str
    rel: tuple[str, ...]
    size: np.ndarray
    mtime_ns: np.ndarray
    kind: np.ndarray
    width: np.ndarray
    height: np.ndarray
    reasons: dict[str, str] = field(default_factory=dict)  # rel path → why it is unusable

    def __len__(self) -> int:
        return len(self.rel)

    def usable(self) -> np.ndarray:
        """Boolean mask of the files the DALI backend may decode."""
        return self.kind < len(USABLE)

    def counts(self) -> dict[str, int]:
        """Files per kind, every kind listed (zeros included), in KINDS order."""
        found = np.bincount(self.kind.astype(np.int64), minlength=len(KINDS))
        return {k: int(found[i]) for i, k in enumerate(KINDS)}

    def files_of(self, kinds: Sequence[str]) -> list[tuple[str, str, str]]:
        """(path, kind, reason) of every file whose kind is in ``kinds``, in index order."""
        codes = [KIND_CODE[k] for k in kinds]
        rows = np.flatnonzero(np.isin(self.kind, codes))
        return [
            (self.path(i), KINDS[self.kind[i]], self.reasons.get(self.rel[i], ""))
            for i in rows.tolist()
        ]

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.rel[i])


def index_path(root: str | os.PathLike[str], list_file: str | os.PathLike[str] = "") -> Path:
    """Where the index of ``root`` (optionally restricted to a list file) is cached."""
    ident = f"{os.path.abspath(root)}\0{os.path.abspath(list_file) if list_file else ''}"
    name = hashlib.sha256(ident.encode()).hexdigest()[:20]
    return cache_dir() / "index" / f"{name}.npz"


def relative_paths(paths: Sequence[str], root: str) -> list[str]:
    """Paths relative to ``root`` by prefix (os.path.relpath is too slow for millions)."""
    prefix = os.path.expanduser(root).rstrip(os.sep) + os.sep
    n = len(prefix)
    return [p[n:] if p.startswith(prefix) else os.path.abspath(p) for p in paths]


def _stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns), or (-1, -1) when the file cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _chunks(n: int) -> list[range]:
    return [range(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]


def _parallel(
    n: int,
    work: Callable[[range], None],
    threads: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Run ``work`` over chunks of range(n) in a thread pool (PIL and os.stat release the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        futures = {pool.submit(work, r): len(r) for r in _chunks(n)}
        for fut in as_completed(futures):
            fut.result()
            if progress is not None:
                progress(futures[fut])


def default_threads() -> int:
    return min(32, os.cpu_count() or 1)


@dataclass
class _Records:
    """Mutable arrays being filled by a scan."""

    size: np.ndarray
    mtime_ns: np.ndarray
    kind: np.ndarray
    width: np.ndarray
    height: np.ndarray
    reasons: dict[str, str]

    @classmethod
    def empty(cls, n: int) -> _Records:
        def z(dtype: type) -> np.ndarray:
            return np.zeros(n, dtype)

        return cls(z(np.int64), z(np.int64), z(np.int8), z(np.int32), z(np.int32), {})

    def freeze(self, root: str, rel: Sequence[str]) -> ImageIndex:
        return ImageIndex(root, tuple(rel), **vars(self))  # the same arrays, not copies


def _stat_all(paths: Sequence[str], rec: _Records, threads: int) -> None:
    def work(r: range) -> None:
        for i in r:
            rec.size[i], rec.mtime_ns[i] = _stat(paths[i])

    _parallel(len(paths), work, threads)


def _decode_into(
    paths: Sequence[str],
    rel: Sequence[str],
    rows: np.ndarray,
    rec: _Records,
    threads: int,
    progress: Callable[[int], None] | None,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> None:
    """Check the files at ``rows`` and write their verdicts into ``rec``."""

    def work(r: range) -> None:
        for j in r:
            i = int(rows[j])
            c = check_file(paths[i], max_image_pixels)
            rec.kind[i], rec.width[i], rec.height[i] = KIND_CODE[c.kind], c.width, c.height
            if c.kind not in USABLE:
                rec.reasons[rel[i]] = c.reason

    _parallel(len(rows), work, threads, progress)


def _blob(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", "surrogateescape"), np.uint8)


def _unblob(arr: np.ndarray) -> str:
    return arr.tobytes().decode("utf-8", "surrogateescape")


def save_index(index: ImageIndex, path: Path) -> None:
    """Write the index atomically (plain arrays; paths NUL-joined, as NUL cannot occur in one)."""
    meta = {
        "version": VERSION,
        "root": index.root,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "counts": index.counts(),
        "reasons": index.reasons,
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                rel=_blob("\0".join(index.rel)),
                size=index.size,
                mtime_ns=index.mtime_ns,
                kind=index.kind,
                width=index.width,
                height=index.height,
                meta=_blob(json.dumps(meta)),
            )

    atomic_write(path, write)


def load_index(path: Path) -> ImageIndex | None:
    """The cached index, or None when absent, unreadable or of another format version."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(_unblob(z["meta"]))
            if meta.get("version") != VERSION:
                return None
            text = _unblob(z["rel"])
            rel = tuple(text.split("\0")) if text else ()
            a = {k: z[k] for k in ("size", "mtime_ns", "kind", "width", "height")}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    if any(len(v) != len(rel) for v in a.values()):
        return None
    reasons = dict(meta.get("reasons", {}))
    return ImageIndex(str(meta["root"]), rel, reasons=reasons, **a)


@dataclass(frozen=True)
class IndexBuild:
    index: ImageIndex
    path: Path  # where it is cached
    checked: int  # files decoded by this call (0: every record was reused)
    seconds: float


def _reuse(old: ImageIndex, rel: Sequence[str], rec: _Records) -> np.ndarray:
    """Copy the records of unchanged files (same path, size, mtime) from ``old`` into ``rec``;
    returns the rows that still need a decode test."""
    where = {r: j for j, r in enumerate(old.rel)}
    src = np.array([where.get(r, -1) for r in rel], dtype=np.int64)
    hit = src >= 0
    same = np.zeros(len(rel), bool)
    same[hit] = (old.size[src[hit]] == rec.size[hit]) & (
        old.mtime_ns[src[hit]] == rec.mtime_ns[hit]
    )
    for name in ("kind", "width", "height"):
        getattr(rec, name)[same] = getattr(old, name)[src[same]]
    for i in np.flatnonzero(same & (rec.kind >= len(USABLE))).tolist():
        rec.reasons[rel[i]] = old.reasons.get(rel[i], "")
    return np.flatnonzero(~same)


def _apply_limit(
    rec: _Records, rel: Sequence[str], todo: np.ndarray, max_image_pixels: int | None
) -> tuple[np.ndarray, bool]:
    """Judge reused records again against this pixel limit: decoded files now over it become
    "huge" (not decoded again), "huge" ones now under it join ``todo``. Returns the new rows to
    decode and whether any record changed."""
    reused = np.ones(len(rel), bool)
    reused[todo] = False
    limit = np.iinfo(np.int64).max if max_image_pixels is None else max_image_pixels
    pixels = rec.width.astype(np.int64) * rec.height.astype(np.int64)
    huge = KIND_CODE["huge"]
    over = reused & np.isin(rec.kind, _DECODED) & (pixels > limit)
    under = reused & (rec.kind == huge) & (pixels <= limit)
    for i in np.flatnonzero(over | (reused & (rec.kind == huge) & ~under)).tolist():
        rec.kind[i] = huge  # the reason names this call's limit
        rec.reasons[rel[i]] = pixel_problem(int(rec.width[i]), int(rec.height[i]), limit)
    for i in np.flatnonzero(under).tolist():
        rec.reasons.pop(rel[i], None)
    return np.union1d(todo, np.flatnonzero(under)).astype(np.int64), bool(over.any() or under.any())


def _require_writable(folder: Path) -> None:
    """UserError naming ``folder`` unless a file can be created in it: checked before decoding,
    so a read-only cache fails in a second, not after hours of decoding."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise unwritable_cache("the data index", folder, e) from None


def build_index(
    paths: Sequence[str],
    root: str | os.PathLike[str],
    cache: Path,
    *,
    threads: int | None = None,
    rescan: bool = False,
    verify: bool = True,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> IndexBuild:
    """The index of ``paths`` (in their order), reusing the cached one at ``cache`` for files
    whose size and mtime are unchanged, decoding the rest, and saving it when anything changed.

    ``verify=False`` trusts a cached index built for exactly these paths without stat'ing
    them (for processes that wait while another one refreshed it); ``rescan`` ignores the cache.
    Images over ``max_image_pixels`` (None: no limit) are of kind "huge", never decoded.
    A cache folder that cannot be written is a UserError (set SSLCTL_CACHE), before decoding.
    """
    t0 = time.perf_counter()
    root_s = os.path.abspath(root)
    rel = relative_paths(paths, str(root))
    old = None if rescan else load_index(cache)
    if old is not None and old.root != root_s:
        old = None
    if old is not None and not verify and old.rel == tuple(rel):
        return IndexBuild(old, cache, 0, time.perf_counter() - t0)
    threads = threads or default_threads()
    rec = _Records.empty(len(paths))
    _stat_all(paths, rec, threads)
    todo = _reuse(old, rel, rec) if old is not None else np.arange(len(paths))
    todo, judged = _apply_limit(rec, rel, todo, max_image_pixels)
    save = bool(len(todo)) or judged or old is None or old.rel != tuple(rel)
    if save:
        _require_writable(cache.parent)
    if len(todo):
        from sslctl import log

        log.info(
            f"decode-checking {len(todo):,} of {len(paths):,} images ({threads} threads); "
            f"index cached at {cache}"
        )
        with log.make_progress("data check", unit="images", plain_every_s=10.0) as bar:
            task = bar.add_task("data check", total=len(todo), stats="")
            _decode_into(
                paths, rel, todo, rec, threads, lambda k: bar.advance(task, k), max_image_pixels
            )
    index = rec.freeze(root_s, rel)
    if save:
        try:
            save_index(index, cache)
        except OSError as e:  # e.g. the disk filled up while decoding
            raise unwritable_cache("the data index", cache.parent, e) from None
    return IndexBuild(index, cache, len(todo), time.perf_counter() - t0)
