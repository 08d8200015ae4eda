"""Dataset readers: image folders and robust RGB decoding.

A sample is ``(path, label)``. Folder order follows torchvision's ``ImageFolder`` (sorted class
folders, sorted files, walked recursively) so that class indices and dataset order agree with
models and features produced by torchvision-based code.

Two things torchvision's walk does not survive are skipped and counted (``Skipped``): a directory
reached a second time (a symlink loop such as ``up -> ..`` never ends; ``self -> .`` repeats every
image) and a FIFO, socket or device behind an image name (opening a FIFO blocks until a writer
comes, i.e. forever).

List files are read by ``sslctl.data.listfile``; every path or line a message quotes goes
through ``sslctl.data.text.quote``.

Pixel limit: PIL's own process-wide limit (``Image.MAX_IMAGE_PIXELS``: a raw
DecompressionBombWarning at 89 M pixels, an error at 179 M, whatever the user configured) is
switched off here, and every decoder in sslctl.data checks ``max_image_pixels`` itself, from the
header (``Image.open`` is lazy) and before decoding: an image over it is never decoded.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sslctl import UserError
from sslctl.data.text import quote, warn

# Our check (pixel_problem) replaces PIL's: see the module docstring.
Image.MAX_IMAGE_PIXELS = None

Sample = tuple[str, int]

# The default of data.max_image_pixels (and of `data check --max-image-pixels`): PIL's own
# refusal threshold (2 × its 89,478,485-pixel warning), i.e. about 13,000 × 13,000; an RGB
# image of that size takes 537 MB decoded.
MAX_IMAGE_PIXELS = 178_956_970


# Longer list-file paths cannot name a file (Linux PATH_MAX): such an entry is a corrupt line.
MAX_PATH_CHARS = 4096

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Pillow modes that hold 16-bit samples; converting them to RGB directly clips at 255.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")

NOT_REGULAR = "not a regular file (FIFO, socket or device): never opened, reading one can block"


def is_special_mode(mode: int) -> bool:
    """A FIFO, socket or device (``st_mode``): opening a FIFO with no writer blocks forever, a
    device may never end or have side effects, so such a file is never opened as an image."""
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


@dataclass
class Skipped:
    """What a scan left out on purpose, counted so that the caller can say so."""

    dir_links: int = 0  # directories reached again: symlink loops, two links to one folder
    special: int = 0  # FIFOs, sockets, devices named like images
    long_paths: int = 0  # list-file entries longer than MAX_PATH_CHARS (no file has such a name)

    @property
    def total(self) -> int:
        return self.dir_links + self.special + self.long_paths

    def describe(self) -> str:
        """One phrase for a warning or a report ('' when nothing was skipped)."""
        parts = []
        if self.dir_links:
            parts.append(
                f"{self.dir_links:,} directory link(s) to a folder already scanned (a symlink "
                "loop such as 'up -> ..' or a second link to one folder; each folder is read once)"
            )
        if self.special:
            parts.append(
                f"{self.special:,} image name(s) that are not regular files (FIFO, socket or "
                "device; never opened)"
            )
        if self.long_paths:
            parts.append(
                f"{self.long_paths:,} list entr{'y' if self.long_paths == 1 else 'ies'} with a "
                f"path over {MAX_PATH_CHARS:,} characters (no file system opens one)"
            )
        return " and ".join(parts)

    def add(self, other: Skipped) -> None:
        self.dir_links += other.dir_links
        self.special += other.special
        self.long_paths += other.long_paths

    def warn(self, where: str) -> None:
        if self.total:
            warn(f"{quote(where)}: skipped {self.describe()}")


_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(key: str, msg: str) -> None:
    """Print warning ``msg`` the first time ``key`` is seen in this process (rank 0 only)."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warn(msg)


class DecodeError(UserError):
    """An image file that cannot be decoded (zero bytes, truncated, not an image, unreadable).

    A UserError, so that evaluation commands stop with one line naming the file. ``kind`` is
    "huge" for an image over the pixel limit (never decoded), "" otherwise.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str = "", kind: str = ""):
        text = os.fsdecode(path)
        self.kind = kind
        if not reason and "\n" in text:
            # Re-raised in the main process by a DataLoader worker, which passes its formatted
            # traceback as the only argument: keep the original message (its last line).
            text = text.rstrip().rsplit("\n", 1)[-1].split("DecodeError: ", 1)[-1]
            self.path, self.reason = text, ""
            super().__init__(text)
            return
        self.path, self.reason = text, reason
        msg = f"cannot decode image {quote(text)}: {quote(reason)}" if reason else quote(text)
        super().__init__(msg)

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (DecodeError, (self.path, self.reason, self.kind))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _dir_key(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a directory, the same whichever link leads to it; None if unreadable."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _is_dir(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_dir()  # follows symlinks, as os.walk(followlinks=True) did
    except OSError:
        return False


def _is_special(e: os.DirEntry[str]) -> bool:
    """Whether a non-directory entry is a FIFO, socket or device (itself or behind a link)."""
    try:
        if e.is_file(follow_symlinks=False):
            return False  # answered from the directory listing: no system call per image
        return is_special_mode(e.stat().st_mode)
    except OSError:
        return False  # a dangling link stays a sample, so that data check reports it unreadable


def _list_dir(d: str, skipped: Skipped) -> tuple[list[tuple[str, bool]], list[str]]:
    """(sub-directories as (name, is a symlink), image file names) of ``d``, sorted by name;
    hidden entries left out, non-regular image names counted in ``skipped`` and left out."""
    try:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return [], []  # unreadable: skipped silently, as os.walk does
    dirs: list[tuple[str, bool]] = []
    files: list[str] = []
    for e in entries:
        if e.name.startswith("."):
            continue  # .ipynb_checkpoints, .git, .DS_Store
        if _is_dir(e):
            dirs.append((e.name, e.is_symlink()))
        elif _is_image(e.name):
            if _is_special(e):
                skipped.special += 1
            else:
                files.append(e.name)
    return dirs, files


class _Walk:
    """Walks class folders recursively, reading each real directory (st_dev, st_ino) once.

    Why not os.walk(followlinks=True): a link to an ancestor (``up -> ..``) makes it walk
    forever and ``self -> .`` repeats every image. Every real (non-symlink) directory is read
    before any symlinked one, so that a link inside the tree never moves a folder's images to
    another path or class; a link out of the tree (a data set linked in) is followed once.
    """

    def __init__(self, root: str, skipped: Skipped):
        self.seen = {_dir_key(root)}  # files directly in root belong to no class
        self.skipped = skipped
        self.real: list[tuple[int, str]] = []  # a stack: depth first, in name order
        self.links: deque[tuple[int, str]] = deque()

    def _push(self, label: int, path: str, is_link: bool) -> None:
        (self.links if is_link else self.real).append((label, path))

    def run(self, tops: list[str]) -> list[list[str]]:
        """Image paths under each of ``tops``, in torchvision's order (folders sorted by path,
        files by name)."""
        walked: list[list[tuple[str, list[str]]]] = [[] for _ in tops]
        for label in reversed(range(len(tops))):
            self._push(label, tops[label], os.path.islink(tops[label]))
        while self.real or self.links:
            label, d = self.real.pop() if self.real else self.links.popleft()
            key = _dir_key(d)
            if key is None:
                continue  # vanished or unreadable: skipped silently, as os.walk does
            if key in self.seen:
                self.skipped.dir_links += 1
                continue
            self.seen.add(key)
            dirs, files = _list_dir(d, self.skipped)
            walked[label].append((d, files))
            for name, is_link in reversed(dirs):
                self._push(label, os.path.join(d, name), is_link)
        return [[os.path.join(d, f) for d, files in sorted(w) for f in files] for w in walked]


def stat_or_none(path: str | os.PathLike[str]) -> os.stat_result | None:
    """os.stat, or None for a name that names nothing (missing, too long, a NUL byte)."""
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def require_dir(path: str | os.PathLike[str], what: str, hint: str = "") -> Path:
    """``path`` as a Path when it is a directory; else a one-line UserError saying what it is.

    ``what`` names it for the user (``--data``, "data folder"); ``hint`` is added in brackets
    when it is a file (e.g. where a list file goes instead, in that command's words).
    """
    p = Path(path).expanduser()
    st = stat_or_none(p)
    if st is None:
        raise UserError(f"{what} {quote(p)} does not exist (pass an existing directory)")
    if stat.S_ISDIR(st.st_mode):
        return p
    if stat.S_ISREG(st.st_mode):
        raise UserError(
            f"{what} {quote(p)} is a file, not a directory" + (f" ({hint})" if hint else "")
        )
    raise UserError(f"{what} {quote(p)} is not a directory")


def scan_imagefolder(
    root: str | os.PathLike[str], skipped: Skipped | None = None, *, hint: str = ""
) -> tuple[list[Sample], list[str]]:
    """Samples and class names of an ImageFolder tree ``root/<class>/**/<image>``.

    Labels index the sorted class-folder names (empty class folders keep their index, as in
    torchvision). A folder without class sub-folders but with images directly inside is read as
    one class named "" (label 0) — the usual layout of unlabelled pre-training data.
    Hidden files and folders are skipped (torchvision would make ``.ipynb_checkpoints`` a class).
    Directory links to a folder already read and non-regular files are skipped with a warning;
    their counts are also added to ``skipped`` when given (for a report). ``hint`` is added to
    the error for a file passed as ``root`` (where that command takes a list file).
    """
    path = require_dir(root, "data folder", hint)
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise UserError(
            f"cannot read data folder {quote(path)} ({e.strerror or type(e).__name__}); "
            "check its permissions"
        ) from None
    classes = [e.name for e in entries if _is_dir(e) and not e.name.startswith(".")]
    found = Skipped()
    walked = _Walk(str(path), found).run([os.path.join(path, c) for c in classes])
    samples = [(p, label) for label, paths in enumerate(walked) for p in paths]
    if not samples:
        classes = [""]
        samples = [(p, 0) for p in _loose_images(entries, found)]
    found.warn(f"data folder {path}")
    if skipped is not None:
        skipped.add(found)
    if not samples:
        exts = " ".join(IMAGE_EXTENSIONS)
        also = f"; skipped {found.describe()}" if found.total else ""
        where = quote(path, 120)
        raise UserError(
            f"no images found in {where} (expected {where}/<class>/<image> or images directly "
            f"inside; extensions {exts}){also}"
        )
    return samples, classes


def _loose_images(entries: list[os.DirEntry[str]], skipped: Skipped) -> list[str]:
    """Regular image files directly in the data folder (a tree without class folders)."""
    paths = []
    for e in entries:
        if not _is_image(e.name) or _is_dir(e):
            continue
        if _is_special(e):
            skipped.special += 1
        elif e.is_file():
            paths.append(e.path)
    return paths


def pixel_problem(width: int, height: int, max_image_pixels: int | None) -> str:
    """Why a width×height image is not decoded ("" when it may be): over ``max_image_pixels``
    (None: no limit). Sizes come from the header, so nothing has been allocated yet."""
    if max_image_pixels is None or width * height <= max_image_pixels:
        return ""
    return (
        f"{width:,}×{height:,} = {width * height:,} pixels, over the limit of "
        f"{max_image_pixels:,} (max_image_pixels); not decoded"
    )


def frame_count(img: Image.Image) -> int:
    """Frames in an opened image (1 for still formats, and for MPO: a camera JPEG whose extra
    frames are previews or a second view, decoded as its first JPEG by every decoder)."""
    if img.format == "MPO":
        return 1
    try:
        return int(getattr(img, "n_frames", 1))
    except Exception:  # noqa: BLE001 - a broken later frame: the first one is what is decoded
        return 1


def _is_multi_frame(img: Image.Image) -> bool:
    if img.format == "MPO":
        return False
    try:
        animated = getattr(img, "is_animated", None)  # cheaper than n_frames (a GIF's scan)
    except Exception:  # noqa: BLE001 - see frame_count
        return False
    return frame_count(img) > 1 if animated is None else bool(animated)


def load_rgb(
    path: str | os.PathLike[str], max_image_pixels: int | None = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image, or raise DecodeError.

    The format is detected from the content, not the extension (a PNG named .JPEG decodes).
    Pixels are decoded eagerly (``load()``), so truncated files fail here and not later inside
    a transform; PIL's LOAD_TRUNCATED_IMAGES is left off on purpose: a half-grey image would
    silently enter training. Grayscale, CMYK and palette images become RGB; alpha is dropped
    without compositing (the colour under transparent pixels is kept), exactly as
    torchvision's ImageFolder loader does, so features match the reference pipelines.
    16-bit images are scaled to 8 bits rather than clipped. EXIF orientation is ignored, as in
    torchvision. An image over ``max_image_pixels`` (None: no limit) is refused from its header
    (DecodeError of kind "huge"), before anything is allocated. Of an animated or multi-page
    file the first frame is used, as torchvision's loader does (warned once per process).
    """
    _refuse_special(path)
    try:
        with Image.open(path) as img:
            problem = pixel_problem(img.width, img.height, max_image_pixels)
            if problem:
                raise DecodeError(path, problem, kind="huge")
            if _is_multi_frame(img):
                img.seek(0)  # probing for a second frame may have moved it
                warn_once(
                    "multi-frame",
                    f"{quote(path)} has several frames (animated or multi-page): its first frame "
                    "is used; other such files are not reported ('sslctl data check' counts them)",
                )
            img.load()
            return _to_rgb(img)
    except UnidentifiedImageError:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise DecodeError(
            path, "empty file" if empty else "not an image format PIL reads"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DecodeError(path, _reason(e)) from None


def _reason(e: BaseException) -> str:
    """An exception as a reason, without the file name an OSError repeats (a path quoted
    twice, in full: a 50 MB name would print 100 MB)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _refuse_special(path: str | os.PathLike[str]) -> None:
    """DecodeError for a FIFO, socket or device, before Image.open would block on it. Scans
    already leave these out; this covers one created after the scan (a stat costs ~µs, a
    decode ~ms)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return  # missing, unreadable or unnameable: Image.open says why
    if is_special_mode(mode):
        raise DecodeError(path, NOT_REGULAR)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img  # already loaded: usable after the file is closed
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float32) / 257.0  # 65535 / 255: full range to full range
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        return gray.convert("RGB")
    return img.convert("RGB")
