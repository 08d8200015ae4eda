"""The bundled demo data set: scikit-learn's handwritten digits drawn as white ink on black.

scikit-learn ships its 1,797 8×8 digits inside the package, so the demo needs no network. Raw
8×8 digits are too easy (raw-pixel kNN ≈ 96 %), so each is drawn at a random size (20–36 px),
stroke width and rotation at a random place of a 48×48 canvas: raw-pixel kNN falls to ≈ 53 %
and a randomly initialised convnet4's features to ≈ 46 %. SSL pre-training's random crops teach
invariance to position and size (the demo's learned features: kNN ≈ 59 %).
The images are written once, as real PNG files in the ImageFolder layout, under the user cache
directory.

digits-v1 (before this version, see CHANGELOG) drew the digits in colour on noisy, muted random
backgrounds; at the demo's budget (minutes on 2 CPU cores) none of the backbones and settings
we tried learned from it (BENCHMARKS.md), so the demo could not show that pre-training works.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from sslctl import UserError
from sslctl.data.text import quote
from sslctl.files import cache_dir, unwritable_cache

VERSION = "digits-v2"
CANVAS = 48  # pixels; the demo trains on 32-pixel crops of these
TRAIN_RENDERINGS = 2  # renderings of each training digit (different size, stroke, place)
VAL_SIZE = 360  # stratified hold-out, 20 % of the 1,797 digits
SEED = 20210417

DESCRIPTION = (
    f"{VERSION}: scikit-learn's 1,797 handwritten digits (10 classes) drawn as "
    f"{CANVAS}×{CANVAS} images, white ink on black — each digit rescaled to 20–36 px, rotated, "
    f"thickened or thinned, placed at random. "
    f"train: {TRAIN_RENDERINGS} renderings of each of 1,437 digits; val: one rendering of each "
    f"of the other 360 (stratified split). ImageFolder layout train/<digit>/, val/<digit>/."
)


SENTINEL = "bundled"  # what --data, data.root and eval.knn_train/knn_val say for this set


def resolve(root: str | os.PathLike[str], split: str = "") -> Path:
    """``root`` as a folder: the ``"bundled"`` sentinel → the demo set's ``split`` folder (its
    root when ``split`` is empty; built on first use), anything else → that path as given."""
    if str(root) == SENTINEL:
        return bundled_root() / split
    return Path(root)


def bundled_root() -> Path:
    """The folder holding train/ and val/ of the demo set, built on first use.

    Safe under concurrent first use: each process builds in its own temporary folder and
    renames it into place; a process that loses the race discards its copy.
    """
    root = cache_dir() / VERSION
    if (root / "manifest.json").is_file():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{VERSION}.", dir=root.parent))
    except OSError as e:
        raise unwritable_cache("the demo data set", root.parent, e) from None
    try:
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; a shared SSLCTL_CACHE must stay readable
            _build(tmp)
        except OSError as e:  # the disk filled up, the folder was made read-only meanwhile
            raise unwritable_cache("the demo data set", root.parent, e) from None
        try:
            os.replace(tmp, root)
        except OSError as e:
            if not (root / "manifest.json").is_file():  # not a lost race: a real failure
                raise UserError(
                    f"cannot move the demo data set into {quote(root)} ({e.strerror}); if that "
                    "folder exists without a manifest.json it is an incomplete copy: delete it"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=VAL_SIZE, stratify=labels, random_state=SEED)
    return np.sort(train), np.sort(val)


def _build(out: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    train, val = _split(labels)
    counts = {}
    for split, indices, renderings in (("train", train, TRAIN_RENDERINGS), ("val", val, 1)):
        for d in range(10):
            (out / split / str(d)).mkdir(parents=True)
        for i in indices:
            for r in range(renderings):
                img = render_digit(images[i], image_rng(int(i), r))
                img.save(out / split / str(labels[i]) / f"{i:04d}_{r}.png")
        counts[split] = len(indices) * renderings
    manifest = {"version": VERSION, "description": DESCRIPTION, "images": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def image_rng(index: int, rendering: int) -> np.random.Generator:
    """The RNG of one file, keyed by the digit's index and the rendering number: any file can
    be reproduced alone, independently of build order."""
    return np.random.default_rng([SEED, index, rendering])


def _glyph(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The digit's ink as a soft mask in [0, 1], rescaled, reshaped and rotated."""
    size = int(rng.integers(20, 37))
    ink = Image.fromarray((digit * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    stroke = rng.integers(3)  # stroke thickness: thin, as drawn, thick
    if stroke == 0:
        ink = ink.filter(ImageFilter.MinFilter(3))
    elif stroke == 2:
        ink = ink.filter(ImageFilter.MaxFilter(3))
    ink = ink.rotate(rng.uniform(-15, 15), Image.Resampling.BILINEAR, expand=False)
    mask = np.asarray(ink, np.float32) / 255.0
    return np.clip((mask - 0.25) * 2.0, 0, 1)  # firm edges, faint pen marks dropped


def render_digit(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One CANVAS×CANVAS RGB image of an 8×8 digit (values in [0, 1]): the ink, white on
    black, at a random place of the canvas."""
    mask = _glyph(digit, rng)
    h, w = mask.shape
    top, left = int(rng.integers(0, CANVAS - h + 1)), int(rng.integers(0, CANVAS - w + 1))
    canvas = np.zeros((CANVAS, CANVAS), np.uint8)
    canvas[top : top + h, left : left + w] = np.rint(mask * 255).astype(np.uint8)
    return Image.fromarray(canvas).convert("RGB")
