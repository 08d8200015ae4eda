"""The DALI graph: how one batch of encoded images becomes rendered views inside a pipeline.

The parameters of every view are drawn in Python (``sslctl.data.draws``) and reach the graph as
per-sample arrays (``view_arrays``, in the order ``VIEW_FIELDS`` names); the graph only renders
them. Also: whether DALI is installed (``dali_available``, ``require_dali``).

Units: DALI's hue is in degrees (``views.hue_degrees``); blur needs an explicit kernel size
(``views.blur_kernel_size``). torchvision applies the four jitter adjustments in a random order,
this backend always as brightness → contrast → saturation/hue; DALI's hue rotation is linear in
YIQ (hue shifts of the same mean, ±10° spread) for hue ranges up to ``YIQ_HUE_MAX`` (BYOL's and
MoCo v2's ±0.1 turn), while wider ranges (SimCLR's ±0.2) repeat torchvision's 8-bit HSV shift
(``_pil_hue``); contrast blends with the image's mean luma, as torchvision does. Images are
decoded without EXIF rotation, as torchvision reads them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sslctl import UserError
from sslctl.data.draws import ViewParams
from sslctl.data.views import ViewSpec, blur_kernel_size, hue_degrees

if TYPE_CHECKING:
    from sslctl.data.dali_runner import Feed

INSTALL_HINT = (
    "install it with `pip install 'sslctl[dali]'` (package nvidia-dali-cuda130; with a CUDA 12 "
    "driver `pip install 'sslctl[dali-cuda12]'`), or use --set data.backend=torchvision"
)

# Per-view arrays the feed produces, in this order (see view_arrays and _render_view).
VIEW_FIELDS = (
    "roi_start",  # (y, x) of the crop box in source pixels
    "roi_end",
    "jitter",  # bool: colour jitter applied
    "brightness",
    "contrast",
    # 0 when the view is grayscale (graying after jitter = zero saturation), except after
    # jitter with _pil_hue: its hue shift changes luma, so graying comes after it
    "saturation",
    "hue",  # degrees (fn.hsv), or PIL hue steps for ranges over YIQ_HUE_MAX (_pil_hue)
    "gray",
    "flip",
    "blur",
    "sigma",
    "window",
    "solarize",
)


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def require_dali() -> Any:
    """The ``nvidia.dali`` module, or a one-line UserError saying how to get it."""
    try:
        import nvidia.dali as dali
    except (ImportError, OSError) as e:
        raise UserError(f"the DALI data backend needs NVIDIA DALI ({e}): {INSTALL_HINT}") from None
    return dali


def _ops() -> tuple[Any, Any, Any]:
    """``nvidia.dali.fn``, ``.types`` and ``.math``, typed Any: DALI's stubs do not cover the
    DataNode arithmetic and conditionals the graph uses (the tests run every line of it)."""
    dali = require_dali()
    import nvidia.dali.math as dmath

    return dali.fn, dali.types, dmath


def _degrees_per_turn(spec: ViewSpec) -> float:
    """torchvision draws hue shifts in turns, DALI wants degrees: the factor, from the one
    written conversion (``views.hue_degrees``)."""
    return hue_degrees(spec) / spec.hue if spec.hue > 0 else 0.0


# DALI's own hue (fn.hsv) rotates the chroma in YIQ, keeping luma; torchvision's shifts the hue
# in PIL's 8-bit HSV, keeping value and saturation (so luma changes). Up to ±0.1 turn (BYOL, MoCo
# v2) the two agree within tests/test_dali.py's tolerances; at SimCLR's ±0.2 turn (72°) the YIQ
# views are darker and flatter (batch channel std off by up to 0.07 of a normalised unit,
# tests/test_view_recipes.py), so wider ranges use _pil_hue: torchvision's arithmetic, several
# times the cost of fn.hsv on the CPU.
YIQ_HUE_MAX = 0.1


def uses_pil_hue(spec: ViewSpec) -> bool:
    return spec.hue > YIQ_HUE_MAX


def pil_hue_steps(hue: float) -> float:
    """torchvision's hue shift of a PIL image (``uint8(int32(hue * 255))``) in PIL's 8-bit hue
    units: a turn is 255 of them, and the shifted hue wraps at 256 (torchvision's uint8 sum)."""
    return float(int(hue * 255) % 256)


def view_arrays(params: Sequence[ViewParams], spec: ViewSpec) -> list[np.ndarray]:
    """The drawn parameters of one view for a batch, as the arrays VIEW_FIELDS names."""
    n = len(params)
    start, end = np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32)
    colour = np.tile(np.array([1.0, 1.0, 1.0, 0.0], np.float32), (n, 1))  # b, c, s, hue
    sigma, window = np.ones(n, np.float32), np.full(n, 3, np.int32)
    to_deg = _degrees_per_turn(spec)
    pil_hue = uses_pil_hue(spec)
    for i, p in enumerate(params):
        left, top, right, bottom = p.box
        start[i], end[i] = (top, left), (bottom, right)
        if p.jitter is not None:
            _, b, c, s, h = p.jitter
            colour[i] = (b, c, s, pil_hue_steps(h) if pil_hue else h * to_deg)
        if p.gray and not (pil_hue and p.jitter is not None):
            colour[i, 2] = 0.0
        if p.blur_sigma is not None:
            sigma[i], window[i] = p.blur_sigma, blur_kernel_size(p.blur_sigma)

    def flags(attr: Callable[[ViewParams], object]) -> np.ndarray:
        return np.array([bool(attr(p)) for p in params], dtype=bool)

    return [
        start,
        end,
        flags(lambda p: p.jitter is not None),
        *(np.ascontiguousarray(colour[:, k]) for k in range(4)),
        flags(lambda p: p.gray),
        np.array([p.flip for p in params], np.int32),
        flags(lambda p: p.blur_sigma is not None),
        sigma,
        window,
        flags(lambda p: p.solarize),
    ]


def view_types(types: Any) -> tuple[list[Any], list[int]]:
    """DALI dtypes and ranks of the per-view arrays (external_source checks them)."""
    f, b, i = types.FLOAT, types.BOOL, types.INT32
    dtypes = [f, f, b, f, f, f, f, b, i, b, f, i, b]
    ndims = [1, 1] + [0] * 11
    return dtypes, ndims


def _interp(types: Any, name: str) -> Any:
    return {
        "nearest": types.INTERP_NN,
        "bilinear": types.INTERP_LINEAR,
        "bicubic": types.INTERP_CUBIC,
    }[name]


def _normalize(
    fn: Any,
    types: Any,
    v: Any,
    mirror: Any,
    spec: ViewSpec,
    half: bool,
    nhwc: bool = False,
):
    """uint8 HWC → normalised float (fp16 with ``half``), mirrored where asked; CHW, or HWC
    with ``nhwc`` (the loader then views it as a channels_last NCHW tensor, no copy)."""
    return fn.crop_mirror_normalize(
        v,
        mirror=mirror,
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
        dtype=types.FLOAT16 if half else types.FLOAT,
        output_layout="HWC" if nhwc else "CHW",
    )


def _contrast(v: Any, factor: Any, gpu: bool) -> Any:
    """Blend with the image's mean luma, as torchvision's adjust_contrast (DALI's own contrast
    pivots about mid-grey 128, which darkens or brightens dark or bright images)."""
    fn, types, dmath = _ops()
    luma = fn.color_space_conversion(v, image_type=types.RGB, output_type=types.GRAY)
    mean = fn.reductions.mean(luma, keep_dims=True)
    c = factor.gpu() if gpu else factor
    return fn.cast(dmath.clamp(mean + c * (v - mean), 0.0, 255.0), dtype=types.UINT8)


def _pil_hue(v: Any, steps: Any, gpu: bool) -> Any:
    """torchvision's ``adjust_hue`` of a PIL image: RGB to PIL's 8-bit HSV, hue + ``steps``
    (mod 256), back to RGB — PIL's rounding included (off by one hue step on ~0.1 % of pixels,
    float32 here where PIL mixes in doubles). Elementwise DALI arithmetic on uint8 HWC."""
    fn, types, dmath = _ops()
    x = fn.cast(v, dtype=types.FLOAT)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    val = dmath.max(r, dmath.max(g, b))
    chroma = val - dmath.min(r, dmath.min(g, b))
    red = r == val  # PIL's branches: red is the maximum, else green, else blue
    green = (g == val) & (r != val)
    blue = (r != val) & (g != val)
    num = red * (g - b) + green * (b - r) + blue * (r - g)
    sector = num / dmath.max(chroma, 1.0) + 2.0 * green + 4.0 * blue  # hue in sixths, [-1, 5)
    h = sector * (255.0 / 6.0) + 255.0
    h = dmath.floor(h - 255.0 * dmath.floor(h * (1.0 / 255.0))) + (steps.gpu() if gpu else steps)
    h6 = (h - 256.0 * (h >= 256.0)) * (6.0 / 255.0)  # uint8 wrap-around, then sixths again
    vs = val * (dmath.floor(chroma / dmath.max(val, 1.0) * 255.0) * (1.0 / 255.0))  # value × S
    rgb = []
    for n in (5.0, 3.0, 1.0):  # PIL's six-case HSV → RGB as one piecewise-linear formula
        k = h6 + n
        k = k - 6.0 * (k >= 6.0)
        rgb.append(dmath.floor(val - vs * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0) + 0.5))
    return fn.cast(fn.stack(*rgb, axis=2, axis_name="C"), dtype=types.UINT8)


def _solarize_lut(threshold: int) -> list[float]:
    # PIL's ImageOps.solarize (the reference): values >= threshold are inverted.
    return [float(255 - v if v >= threshold else v) for v in range(256)]


def _render_view(
    img: Any, a: dict[str, Any], spec: ViewSpec, gpu: bool, half: bool, nhwc: bool = False
) -> Any:
    """One view of the decoded batch ``img`` from the drawn parameters ``a`` (DALI graph;
    the ``if``s on DataNodes are DALI conditionals: only the selected samples are processed).

    Horizontal flip is folded into the final normalisation: every step between the crop and
    it is pointwise or a symmetric blur, so flipping last gives the same image."""
    fn, types, _ = _ops()
    v = fn.resize(
        img,
        roi_start=a["roi_start"],
        roi_end=a["roi_end"],
        size=[spec.size, spec.size],
        interp_type=_interp(types, spec.interpolation),
        antialias=True,  # PIL's resize (the torchvision backend's) antialiases too
    )
    if a["jitter"]:
        v = fn.brightness_contrast(v, brightness=a["brightness"])
        v = _contrast(v, a["contrast"], gpu)
        if uses_pil_hue(spec):
            v = _pil_hue(fn.hsv(v, saturation=a["saturation"]), a["hue"], gpu)
            if a["gray"]:  # after the hue shift, which changes luma (torchvision's order)
                v = fn.hsv(v, saturation=0.0)
        else:
            v = fn.hsv(v, hue=a["hue"], saturation=a["saturation"])
    elif a["gray"]:
        v = fn.hsv(v, saturation=a["saturation"])
    if a["blur"]:
        v = fn.gaussian_blur(v, sigma=a["sigma"], window_size=a["window"])
    if a["solarize"]:
        lut = _solarize_lut(spec.solarize_threshold)
        v = fn.lookup_table(v, keys=list(range(256)), values=lut, dtype=types.UINT8)
    return _normalize(fn, types, v, a["flip"], spec, half, nhwc)


# nvJPEG's buffers grow to the largest image seen; reserving ImageNet-sized room up front
# (NVIDIA's ImageNet example values) avoids reallocations during the first epoch.
_GPU_DECODER_PADDING = {"device_memory_padding": 211_025_920, "host_memory_padding": 140_544_512}


def _decode(fn: Any, types: Any, encoded: Any, gpu: bool) -> Any:
    return fn.decoders.image(
        encoded,
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,  # grayscale and CMYK files become RGB, as load_rgb makes them
        adjust_orientation=False,  # torchvision ignores EXIF orientation
        **(_GPU_DECODER_PADDING if gpu else {}),
    )


def pretrain_graph(
    feed: Feed, specs: tuple[ViewSpec, ViewSpec], gpu: bool, half: bool, nhwc: bool = False
):
    """(view 1, view 2, sample index) of a batch of encoded images (a DALI pipeline body)."""
    fn, types, _ = _ops()
    vt, vn = view_types(types)
    k = len(VIEW_FIELDS)
    outs = fn.external_source(
        source=feed,
        num_outputs=2 + 2 * k,
        batch=True,
        dtype=[types.UINT8, *vt, *vt, types.INT64],
        ndim=[1, *vn, *vn, 0],
    )
    img = _decode(fn, types, outs[0], gpu)
    # (AutoGraph, which rewrites this function for the conditionals, has no zip(strict=...))
    a1 = {name: outs[1 + i] for i, name in enumerate(VIEW_FIELDS)}
    a2 = {name: outs[1 + k + i] for i, name in enumerate(VIEW_FIELDS)}
    v1 = _render_view(img, a1, specs[0], gpu, half, nhwc)
    v2 = _render_view(img, a2, specs[1], gpu, half, nhwc)
    return v1, v2, outs[-1]


def probe_graph(feed: Feed, gpu: bool, half: bool):
    fn, types, _ = _ops()
    (encoded,) = fn.external_source(
        source=feed, num_outputs=1, batch=True, dtype=[types.UINT8], ndim=[1]
    )
    return _decode(fn, types, encoded, gpu)
