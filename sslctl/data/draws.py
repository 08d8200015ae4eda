"""Backend-neutral random draws of the pre-training views, shared by both data backends.

Every random choice of a view (crop box, flip, colour-jitter order and factors, grayscale, blur σ,
solarisation) is drawn here in Python from a per-sample ``random.Random`` (``sample_rng``), in a
fixed order; the torchvision backend (``sslctl.data.tv``) renders the draws with PIL, the DALI
backend (``sslctl.data.dali``) with DALI, so both see the same views of the same sample.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sslctl.data.views import ViewSpec

# ColorJitter draws: the order of (brightness, contrast, saturation, hue), then the four factors
Jitter = tuple[tuple[int, ...], float, float, float, float]


@dataclass(frozen=True)
class ViewParams:
    """The random draws for one view; ``None``/``False`` means the step is skipped."""

    box: tuple[int, int, int, int]  # crop (left, top, right, bottom) in source pixels
    flip: bool
    jitter: Jitter | None
    gray: bool
    blur_sigma: float | None
    solarize: bool


def crop_box(
    width: int, height: int, spec: ViewSpec, rng: random.Random
) -> tuple[int, int, int, int]:
    """A random resized crop: torchvision's RandomResizedCrop.get_params, drawn from ``rng``.

    Up to 10 tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); if none
    fits, the largest centred crop whose aspect ratio lies within ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    w, h = width, height
    if in_ratio < spec.ratio[0]:
        h = round(width / spec.ratio[0])
    elif in_ratio > spec.ratio[1]:
        w = round(height * spec.ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _factor(rng: random.Random, amount: float) -> float:
    return rng.uniform(max(0.0, 1.0 - amount), 1.0 + amount)


def draw_params(width: int, height: int, spec: ViewSpec, rng: random.Random) -> ViewParams:
    """All random choices for one view of a width×height image, in a fixed draw order."""
    box = crop_box(width, height, spec, rng)
    flip = rng.random() < spec.flip_p
    jitter = None
    if rng.random() < spec.jitter_p:
        order = list(range(4))
        rng.shuffle(order)  # torchvision's ColorJitter applies its adjustments in random order
        jitter = (
            tuple(order),
            _factor(rng, spec.brightness),
            _factor(rng, spec.contrast),
            _factor(rng, spec.saturation),
            rng.uniform(-spec.hue, spec.hue),
        )
    gray = rng.random() < spec.gray_p
    blur = rng.uniform(*spec.blur_sigma) if rng.random() < spec.blur_p else None
    solarize = rng.random() < spec.solarize_p
    return ViewParams(box, flip, jitter, gray, blur, solarize)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The RNG of one sample's views; a string seed is hashed with SHA-512 by ``random``,
    which is stable across processes and Python versions (unlike ``hash()``)."""
    return random.Random(f"sslctl/{seed}/{epoch}/{index}")
