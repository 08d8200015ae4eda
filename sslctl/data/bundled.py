"""The bundled demo data set: scikit-learn's handwritten digits rendered as coloured scenes.

scikit-learn ships its 1,797 8×8 digits inside the package, so the demo needs no network. Raw
digits are too easy (raw-pixel kNN ≈ 96 %), so each is rendered as a small photograph-like
image in which what a raw-pixel comparison sees — position, size, colours, background — is
unrelated to the class, while the augmentations of SSL pre-training (crops, colour jitter,
grayscale) teach exactly those invariances. The images are written once, as real PNG files in
the ImageFolder layout, under the user cache directory.
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

VERSION = "digits-v1"
CANVAS = 48  # pixels; the demo trains on 32–40-pixel crops of these
TRAIN_RENDERINGS = 2  # renderings of each training digit (different scenes)
VAL_SIZE = 360  # stratified hold-out, 20 % of the 1,797 digits
SEED = 20210417

DESCRIPTION = (
    f"{VERSION}: scikit-learn's 1,797 handwritten digits (10 classes) rendered as "
    f"{CANVAS}×{CANVAS} colour images — each digit rescaled to 20–36 px, rotated, thickened or "
    f"thinned, placed at random on a smooth, muted random background with noise, in a random "
    f"contrasting colour. "
    f"train: {TRAIN_RENDERINGS} renderings of each of 1,437 digits; val: one rendering of each "
    f"of the other 360 (stratified split). ImageFolder layout train/<digit>/, val/<digit>/."
)


def cache_dir() -> Path:
    """$SSLCTL_CACHE, else $XDG_CACHE_HOME/sslctl, else ~/.cache/sslctl."""
    if os.environ.get("SSLCTL_CACHE"):
        return Path(os.environ["SSLCTL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sslctl"


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
        raise UserError(
            f"cannot create the demo data set under {root.parent} ({e.strerror}); "
            f"set SSLCTL_CACHE to a writable folder"
        ) from None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared SSLCTL_CACHE must stay readable
        _build(tmp)
        try:
            os.replace(tmp, root)
        except OSError as e:
            if not (root / "manifest.json").is_file():  # not a lost race: a real failure
                raise UserError(
                    f"cannot move the demo data set into {root} ({e.strerror}); if that folder "
                    f"exists without a manifest.json it is an incomplete copy: delete it"
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
                # compress_level 1: the noisy backgrounds barely compress anyway; 3× faster
                img.save(out / split / str(labels[i]) / f"{i:04d}_{r}.png", compress_level=1)
        counts[split] = len(indices) * renderings
    manifest = {"version": VERSION, "description": DESCRIPTION, "images": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def image_rng(index: int, rendering: int) -> np.random.Generator:
    """The RNG of one file, keyed by the digit's index and the rendering number: any file can
    be reproduced alone, independently of build order."""
    return np.random.default_rng([SEED, index, rendering])


def _smooth_basis(cells: int) -> np.ndarray:
    """CANVAS×cells weights that spread a cells×cells random field smoothly over the canvas."""
    pos = (np.arange(CANVAS) + 0.5) / CANVAS * cells - 0.5
    w = np.exp(-0.5 * ((pos[:, None] - np.arange(cells)[None, :]) / 0.8) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


_BASIS = _smooth_basis(4)
_COORD = np.arange(CANVAS, dtype=np.float32) / (CANVAS - 1.0) - 0.5


def _background(rng: np.random.Generator) -> np.ndarray:
    """A smooth random scene (CANVAS×CANVAS×3, about [0, 1]): a gradient between two muted
    colours at a random angle, faint colour blotches, pixel noise."""
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(np.cos(angle) * _COORD[None, :] + np.sin(angle) * _COORD[:, None] + 0.5, 0, 1)
    # Muted colours (a grey level plus a slight tint): distinct per image but far less salient
    # than the ink, so that matching two crops by background colour alone is a weak shortcut.
    c0, c1 = (rng.uniform(0.15, 0.85, (2, 1)) + rng.normal(0, 0.08, (2, 3))).astype(np.float32)
    out = c0 + (c1 - c0) * t[..., None]
    field = rng.standard_normal((3, 4, 4), dtype=np.float32) * 0.12
    out += (_BASIS @ field @ _BASIS.T).transpose(1, 2, 0)
    out += rng.standard_normal(out.shape, dtype=np.float32) * 0.04
    return out


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
    """One CANVAS×CANVAS RGB scene of an 8×8 digit (values in [0, 1]): the ink painted at a
    random place of a random background, in a contrasting random colour."""
    bg = _background(rng)
    mask = _glyph(digit, rng)
    h, w = mask.shape
    top, left = int(rng.integers(0, CANVAS - h + 1)), int(rng.integers(0, CANVAS - w + 1))
    alpha = np.zeros((CANVAS, CANVAS, 1), np.float32)
    alpha[top : top + h, left : left + w, 0] = mask
    # The ink's luma differs from the background's under it by >= 0.3, so the digit stays
    # visible after grayscale conversion too.
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    under = float((bg @ luma * alpha[..., 0]).sum() / max(float(alpha.sum()), 1e-6))
    fg = rng.uniform(0, 1, 3).astype(np.float32)
    while abs(float(fg @ luma) - under) < 0.3:
        fg = rng.uniform(0, 1, 3).astype(np.float32)
    img = bg * (1 - alpha) + fg * alpha
    return Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
