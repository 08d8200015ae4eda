"""Small synthetic images written to disk (single files, class folders), shared by the
data-backend tests and the conftest fixtures; and undoing the ImageNet normalisation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslctl.data.views import IMAGENET_MEAN, IMAGENET_STD

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def unnormalize(view: torch.Tensor) -> torch.Tensor:
    """A (C, H, W) or (N, C, H, W) view normalised with the ImageNet mean and std back to
    0..1 RGB."""
    return view * _STD + _MEAN


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def blocks(path: Path, size: int = 32, lo: int = 0, hi: int = 256, seed: int = 0) -> Path:
    """A size×size PNG of colourful 4×4 blocks (saturated enough for hue and saturation to be
    measurable)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(lo, hi, (4, 4, 3))
    return save_png(path, np.kron(cells, np.ones((size // 4, size // 4, 1))))


def photo(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def noise_folder(root: Path, n: int = 48, classes: int = 3, size: int = 20, seed: int = 0) -> Path:
    """root/c<i % classes>/<i:04d>.png: ``n`` size×size random-noise PNGs, deterministic in
    ``seed`` (the tests' ``image_folder`` and ``shared_images`` fixtures build on it)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root


def make_odd_folder(root: Path) -> dict[str, str]:
    """One file of every kind under root/x/; returns {file name: expected kind}."""
    d = root / "x"
    d.mkdir(parents=True)
    img = photo()
    img.save(d / "ok.jpg", quality=90)
    img.convert("L").save(d / "gray.jpg")
    img.convert("CMYK").save(d / "cmyk.jpg")
    img.save(d / "png_inside.JPEG", format="PNG")
    img.save(d / "jpeg_inside.png", format="JPEG")
    img.save(d / "anim.jpg", format="GIF")
    img.save(d / "rgb.png", format="PNG")
    img.convert("P").save(d / "palette.png")
    Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257).save(d / "g16.png")
    full = (d / "ok.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(full[: len(full) // 2])
    png = (d / "rgb.png").read_bytes()
    (d / "trunc.png").write_bytes(png[: len(png) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("not an image at all")
    os.symlink(d / "gone.jpg", d / "dangling.jpg")
    return {
        "ok.jpg": "ok",
        "gray.jpg": "grayscale",
        "cmyk.jpg": "cmyk",
        "png_inside.JPEG": "png-named-jpeg",
        "jpeg_inside.png": "misnamed",
        "anim.jpg": "other-format",
        "rgb.png": "ok",
        "palette.png": "ok",
        "g16.png": "grayscale",
        "trunc.jpg": "truncated",
        "trunc.png": "truncated",
        "zero.jpg": "zero-byte",
        "text.jpg": "not-an-image",
        "dangling.jpg": "unreadable",
    }
