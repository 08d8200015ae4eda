"""Augmentations as data: one view spec, rendered by the torchvision backend and the DALI backend.

Units follow torchvision throughout (hue as a fraction of a turn, blur as a Gaussian σ in
pixels); the conversions other libraries need are written once here, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view (SPEC §1 table), in torchvision units.

    Order of operations: random resized crop → flip → colour jitter (four adjustments in random
    order) → grayscale → Gaussian blur → solarisation → normalisation.
    """

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height)
    interpolation: str = "bicubic"
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4  # factor drawn from U(max(0, 1 - b), 1 + b)
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # fraction of a turn: the hue shift is drawn from U(-hue, hue)
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # σ in output pixels, drawn uniformly
    solarize_p: float = 0.0
    solarize_threshold: int = 128  # uint8 values >= threshold are inverted
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"ViewSpec.size must be >= 1, got {self.size}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"ViewSpec.scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ViewSpec.ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"ViewSpec.interpolation must be one of {INTERPOLATIONS}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ViewSpec.{name} must be a probability in [0, 1]")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"ViewSpec.hue is a fraction of a turn in [0, 0.5], got {self.hue}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(
                f"ViewSpec.blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}"
            )


def byol_views(size: int = 224, scale_min: float = 0.08) -> tuple[ViewSpec, ViewSpec]:
    """BYOL's asymmetric pair (SPEC §1): view 1 always blurred, view 2 sometimes solarised."""
    common = ViewSpec(size=size, scale=(scale_min, 1.0))
    return replace(common, blur_p=1.0, solarize_p=0.0), replace(common, blur_p=0.1, solarize_p=0.2)


def _symmetric(size: int, scale_min: float, **colour: float | str) -> tuple[ViewSpec, ViewSpec]:
    """Two identical views: crop, flip, ``colour`` jitter (p 0.8), grayscale p 0.2, blur p 0.5,
    no solarisation (SimCLR's and MoCo v2's shared recipe)."""
    v = ViewSpec(size=size, scale=(scale_min, 1.0), blur_p=0.5, solarize_p=0.0, **colour)  # type: ignore[arg-type]
    return v, v


def simclr_views(size: int = 224, scale_min: float = 0.08) -> tuple[ViewSpec, ViewSpec]:
    """SimCLR's symmetric pair (Chen et al. 2020, appendix A): crop, flip, colour jitter of
    strength 1 (0.8/0.8/0.8/0.2) with p 0.8, grayscale p 0.2, blur p 0.5, no solarisation."""
    return _symmetric(size, scale_min, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)


def mocov2_views(size: int = 224, scale_min: float = 0.2) -> tuple[ViewSpec, ViewSpec]:
    """MoCo v2's symmetric pair (Chen et al. 2020, "aug_plus"; SimSiam uses it too): crop
    (torchvision's bilinear), jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2, blur p 0.5,
    flip, no solarisation."""
    return _symmetric(
        size, scale_min, interpolation="bilinear", brightness=0.4, contrast=0.4, saturation=0.4,
        hue=0.1,
    )  # fmt: skip


# data.views -> the recipe of the two views (each called with data.image_size, data.crop_scale_min)
VIEW_RECIPES = {"byol": byol_views, "simclr": simclr_views, "mocov2": mocov2_views}


def view_pair(recipe: str, size: int, scale_min: float) -> tuple[ViewSpec, ViewSpec]:
    """The two view specs of ``data.views`` = ``recipe`` at ``size`` px, crops of at least
    ``scale_min`` of the image."""
    return VIEW_RECIPES[recipe](size, scale_min)


def hue_degrees(spec: ViewSpec) -> float:
    """The hue range in degrees, as DALI's ``hue`` argument wants it.

    torchvision measures hue shifts in turns (0.1 = a tenth of the colour wheel); DALI in
    degrees, so torchvision's 0.1 is DALI's 36°.
    """
    return spec.hue * 360.0


def blur_kernel_size(sigma: float) -> int:
    """The odd kernel size that covers ±3σ, for libraries that need an explicit size.

    PIL's ``GaussianBlur(radius=σ)`` (what the reference uses) takes σ alone and sizes its own
    support; DALI and torchvision need a kernel size. ±3σ keeps 99.7 % of the Gaussian's mass,
    so the truncation is invisible in uint8 images. σ = 2.0 → 13 taps (BYOL's fixed 23 taps at
    224 px is ±5.5σ at the largest σ: the same result, more work).
    """
    if sigma <= 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    return 2 * math.ceil(3.0 * sigma) + 1


@dataclass(frozen=True)
class EvalSpec:
    """A deterministic or lightly random evaluation transform.

    crop: "center" = resize the shorter side to ``resize`` then centre-crop height×width;
          "random" = random resized crop to height×width (``scale``) and a horizontal flip with
          ``flip_p`` (linear-evaluation training);
          "none"   = resize straight to height×width, aspect ratio not kept (re-ID, SPEC §6).
    """

    height: int = 224
    width: int = 224
    crop: str = "center"
    resize: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.0
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random", "none"):
            raise ValueError(f"EvalSpec.crop must be center, random or none, got {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"EvalSpec.interpolation must be one of {INTERPOLATIONS}")
        if self.crop == "center" and self.resize < max(self.height, self.width):
            raise ValueError("EvalSpec.resize must be >= the crop size for a centre crop")


# Linear evaluation (SPEC §3) uses torchvision's default bilinear resizing, as the reference
# linear-evaluation pipelines do; only the pre-training views and re-ID are bicubic.
def linear_val(size: int = 224, resize: int = 256) -> EvalSpec:
    return EvalSpec(height=size, width=size, crop="center", resize=resize)


def linear_train(size: int = 224) -> EvalSpec:
    return EvalSpec(height=size, width=size, crop="random", flip_p=0.5)


def reid(height: int = 256, width: int = 128) -> EvalSpec:
    """SPEC §6: bicubic resize to 256×128, no crop (the flip is added by the feature extractor)."""
    return EvalSpec(height=height, width=width, crop="none", interpolation="bicubic")
