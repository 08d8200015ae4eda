"""Dataset readers: image folders, list files, and robust RGB decoding.

A sample is ``(path, label)``. Folder order follows torchvision's ``ImageFolder`` (sorted class
folders, sorted files, walked recursively) so that class indices and dataset order agree with
models and features produced by torchvision-based code.

Two things torchvision's walk does not survive are skipped and counted (``Skipped``): a directory
reached a second time (a symlink loop such as ``up -> ..`` never ends; ``self -> .`` repeats every
image) and a FIFO, socket or device behind an image name (opening a FIFO blocks until a writer
comes, i.e. forever).
"""

from __future__ import annotations

import os
import stat
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sslctl import UserError

Sample = tuple[str, int]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Pillow modes that hold 16-bit samples; converting them to RGB directly clips at 255.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")

NOT_REGULAR = "not a regular file (FIFO, socket or device): never opened, reading one can block"

_STAT_CHUNK = 4096  # list-file paths per stat task: few tasks for a million entries


def is_special_mode(mode: int) -> bool:
    """A FIFO, socket or device (``st_mode``): opening a FIFO with no writer blocks forever, a
    device may never end or have side effects, so such a file is never opened as an image."""
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


@dataclass
class Skipped:
    """What a scan left out on purpose, counted so that the caller can say so."""

    dir_links: int = 0  # directories reached again: symlink loops, two links to one folder
    special: int = 0  # FIFOs, sockets, devices named like images

    @property
    def total(self) -> int:
        return self.dir_links + self.special

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
        return " and ".join(parts)

    def warn(self, where: str) -> None:
        if self.total:
            from rich.markup import escape

            from sslctl import log  # imported late: it pulls in torch via sslctl.dist

            log.warn(escape(f"{where}: skipped {self.describe()}"))


class DecodeError(UserError):
    """An image file that cannot be decoded (zero bytes, truncated, not an image, unreadable).

    A UserError, so that evaluation commands stop with one line naming the file.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str = ""):
        text = str(path)
        if not reason and "\n" in text:
            # Re-raised in the main process by a DataLoader worker, which passes its formatted
            # traceback as the only argument: keep the original message (its last line).
            text = text.rstrip().rsplit("\n", 1)[-1].split("DecodeError: ", 1)[-1]
            self.path, self.reason = text, ""
            super().__init__(text)
            return
        self.path, self.reason = text, reason
        super().__init__(f"cannot decode image {text}: {reason}" if reason else text)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (DecodeError, (self.path, self.reason))


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


def _check_root(root: str | os.PathLike[str], what: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"{what} {path} does not exist (pass an existing directory)")
    if not path.is_dir():
        raise UserError(f"{what} {path} is not a directory")
    return path


def scan_imagefolder(
    root: str | os.PathLike[str], skipped: Skipped | None = None
) -> tuple[list[Sample], list[str]]:
    """Samples and class names of an ImageFolder tree ``root/<class>/**/<image>``.

    Labels index the sorted class-folder names (empty class folders keep their index, as in
    torchvision). A folder without class sub-folders but with images directly inside is read as
    one class named "" (label 0) — the usual layout of unlabelled pre-training data.
    Hidden files and folders are skipped (torchvision would make ``.ipynb_checkpoints`` a class).
    Directory links to a folder already read and non-regular files are skipped with a warning;
    their counts are also added to ``skipped`` when given (for a report).
    """
    path = _check_root(root, "data folder")
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    found = Skipped()
    walked = _Walk(str(path), found).run([os.path.join(path, c) for c in classes])
    samples = [(p, label) for label, paths in enumerate(walked) for p in paths]
    if not samples:
        classes = [""]
        samples = [(p, 0) for p in _loose_images(entries, found)]
    found.warn(f"data folder {path}")
    if skipped is not None:
        skipped.dir_links += found.dir_links
        skipped.special += found.special
    if not samples:
        exts = " ".join(IMAGE_EXTENSIONS)
        also = f"; skipped {found.describe()}" if found.total else ""
        raise UserError(
            f"no images found in {path} (expected {path}/<class>/<image> or images directly "
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


def _openable(paths: list[str]) -> list[bool]:
    """Whether each path is not a FIFO, socket or device (one that cannot be stat'ed passes: the
    decoder reports it). Stat'ed in threads: on a network file system each stat is a round trip,
    and a list file may name a million images."""

    def part(lo: int) -> list[bool]:
        return [_openable_path(p) for p in paths[lo : lo + _STAT_CHUNK]]

    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        parts = pool.map(part, range(0, len(paths), _STAT_CHUNK))
        return [ok for chunk in parts for ok in chunk]


def _openable_path(path: str) -> bool:
    try:
        return not is_special_mode(os.stat(path).st_mode)
    except (OSError, ValueError):  # missing, or a name stat refuses (a NUL byte): the decoder
        return True  # reports it as unreadable, as before


def read_list_file(
    list_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    skipped: Skipped | None = None,
) -> list[Sample]:
    """Samples from a list file of ``relative/path.JPEG label`` lines, paths relative to ``root``.

    The label is optional (default 0). Blank lines and lines starting with ``#`` are skipped.
    A path may contain spaces when a label follows it (the label is the last field).
    Entries naming a FIFO, socket or device are left out with a warning (and counted in
    ``skipped`` when given).
    """
    lp = Path(list_path).expanduser()
    if not lp.is_file():
        raise UserError(f"list file {lp} not found")
    base = _check_root(root, "data root")
    samples: list[Sample] = []
    try:
        text = lp.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{lp}: not a UTF-8 text list file (byte {e.start}); expected 'relative/path label' lines"
        ) from None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = 0
        if len(parts) == 2:
            try:
                label = int(parts[1])
            except ValueError:
                raise UserError(
                    f"{lp}, line {lineno}: expected 'relative/path [integer label]', got {line!r}"
                ) from None
        samples.append((str(base / parts[0]), label))
    if not samples:
        raise UserError(f"list file {lp} has no entries")
    samples = _drop_special(samples, lp, skipped)
    if not os.path.exists(samples[0][0]):
        raise UserError(
            f"{lp}, line 1 of the entries: {samples[0][0]} not found; paths in a list file are "
            f"relative to the data root {base}"
        )
    return samples


def _drop_special(samples: list[Sample], lp: Path, skipped: Skipped | None) -> list[Sample]:
    keep = _openable([p for p, _ in samples])
    found = Skipped(special=keep.count(False))
    found.warn(f"list file {lp}")
    if skipped is not None:
        skipped.special += found.special
    if len(samples) == found.special:
        raise UserError(
            f"list file {lp}: every entry names a FIFO, socket or device, not an image file "
            "(list regular image files)"
        )
    return [s for s, ok in zip(samples, keep, strict=True) if ok]


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image, or raise DecodeError.

    The format is detected from the content, not the extension (a PNG named .JPEG decodes).
    Pixels are decoded eagerly (``load()``), so truncated files fail here and not later inside
    a transform; PIL's LOAD_TRUNCATED_IMAGES is left off on purpose: a half-grey image would
    silently enter training. Grayscale, CMYK and palette images become RGB; alpha is dropped
    without compositing (the colour under transparent pixels is kept), exactly as
    torchvision's ImageFolder loader does, so features match the reference pipelines.
    16-bit images are scaled to 8 bits rather than clipped. EXIF orientation is ignored, as in
    torchvision.
    """
    _refuse_special(path)
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except UnidentifiedImageError:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise DecodeError(
            path, "empty file" if empty else "not an image format PIL reads"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DecodeError(path, str(e) or type(e).__name__) from None


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
