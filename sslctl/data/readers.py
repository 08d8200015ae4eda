"""Dataset readers: image folders, list files, and robust RGB decoding.

A sample is ``(path, label)``. Folder order follows torchvision's ``ImageFolder`` (sorted class
folders, sorted files, walked recursively) so that class indices and dataset order agree with
models and features produced by torchvision-based code.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sslctl import UserError

Sample = tuple[str, int]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Pillow modes that hold 16-bit samples; converting them to RGB directly clips at 255.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


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


def _walk_images(folder: str) -> list[str]:
    """Image files under ``folder``, recursively, in torchvision's order (folders sorted by
    path, files by name); hidden files and folders (.ipynb_checkpoints, .git) skipped."""
    walked = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prunes the walk
        walked.append((dirpath, sorted(f for f in filenames if _is_image(f))))
    return [os.path.join(d, f) for d, files in sorted(walked) for f in files]


def _check_root(root: str | os.PathLike[str], what: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"{what} {path} does not exist (pass an existing directory)")
    if not path.is_dir():
        raise UserError(f"{what} {path} is not a directory")
    return path


def scan_imagefolder(root: str | os.PathLike[str]) -> tuple[list[Sample], list[str]]:
    """Samples and class names of an ImageFolder tree ``root/<class>/**/<image>``.

    Labels index the sorted class-folder names (empty class folders keep their index, as in
    torchvision). A folder without class sub-folders but with images directly inside is read as
    one class named "" (label 0) — the usual layout of unlabelled pre-training data.
    Hidden files and folders are skipped (torchvision would make ``.ipynb_checkpoints`` a class).
    """
    path = _check_root(root, "data folder")
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    samples: list[Sample] = []
    for label, cls in enumerate(classes):
        samples.extend((p, label) for p in _walk_images(os.path.join(path, cls)))
    if not samples:
        loose = [e.path for e in entries if e.is_file() and _is_image(e.name)]
        if loose:
            return [(p, 0) for p in loose], [""]
        exts = " ".join(IMAGE_EXTENSIONS)
        raise UserError(
            f"no images found in {path} (expected {path}/<class>/<image> or images directly "
            f"inside; extensions {exts})"
        )
    return samples, classes


def read_list_file(list_path: str | os.PathLike[str], root: str | os.PathLike[str]) -> list[Sample]:
    """Samples from a list file of ``relative/path.JPEG label`` lines, paths relative to ``root``.

    The label is optional (default 0). Blank lines and lines starting with ``#`` are skipped.
    A path may contain spaces when a label follows it (the label is the last field).
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
    if not os.path.exists(samples[0][0]):
        raise UserError(
            f"{lp}, line 1 of the entries: {samples[0][0]} not found; paths in a list file are "
            f"relative to the data root {base}"
        )
    return samples


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


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img  # already loaded: usable after the file is closed
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float32) / 257.0  # 65535 / 255: full range to full range
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        return gray.convert("RGB")
    return img.convert("RGB")
