"""The DALI backend: the same two views (and evaluation transforms) rendered by NVIDIA DALI.

Decoding runs on the GPU (nvJPEG, ``device="mixed"``) when one is used, otherwise on the CPU;
every later operation runs where the decoded image is.

Design (why it looks like this):
- Randomness is drawn in Python, per sample, by the torchvision backend's own ``draw_params``
  from ``sample_rng(seed, epoch, index)``; DALI only renders the drawn parameters. So both
  backends see the same crops, flips, jitter factors and coin flips for the same sample, a
  resumed epoch renders exactly the views an uninterrupted one would, and thread counts or
  prefetching cannot change anything. Crop boxes need the image size before decoding: the
  preflight index (``sslctl.data.index``) records it.
- Files reach DALI through ``external_source`` (encoded bytes read by a thread pool), in an
  order built in Python from (seed, epoch) exactly like the torchvision backend's
  ``DistributedSampler(drop_last=True)``: same samples per rank, same epoch length.
- Unusable files (per the index) are never read: like the torchvision backend, the sample is
  replaced by the next usable one (index+1, +2, …) with views still seeded by the original
  index, and counted. A file that fails in DALI anyway (changed after the index was built) is
  found by decoding the failed batch's files one by one, skipped, and the epoch continues.

Units: DALI's hue is in degrees (``views.hue_degrees``); blur needs an explicit kernel size
(``views.blur_kernel_size``). torchvision applies the four jitter adjustments in a random order,
this backend always as brightness → contrast → saturation/hue; DALI's hue rotation is linear in
YIQ (hue shifts of the same mean, ±10° spread) for hue ranges up to ``YIQ_HUE_MAX`` (BYOL's and
MoCo v2's ±0.1 turn), while wider ranges (SimCLR's ±0.2) repeat torchvision's 8-bit HSV shift
(``_pil_hue``); contrast blends with the image's mean luma, as torchvision does. Images are
decoded without EXIF rotation, as torchvision reads them.
"""

from __future__ import annotations

import functools
import importlib.util
import queue
import random
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from torch import Tensor
from torch.utils.data import DistributedSampler

from sslctl import UserError, log
from sslctl.data.index import KINDS, ImageIndex
from sslctl.data.readers import DecodeError, Sample
from sslctl.data.tv import ViewParams, crop_box, draw_params, sample_rng
from sslctl.data.views import EvalSpec, ViewSpec, blur_kernel_size, hue_degrees

INSTALL_HINT = (
    "install it with `pip install 'sslctl[dali]'` (package nvidia-dali-cuda130; with a CUDA 12 "
    "driver `pip install 'sslctl[dali-cuda12]'`), or use --set data.backend=torchvision"
)

# Per-view arrays the feed produces, in this order (see _view_arrays and _render_view).
_VIEW_FIELDS = (
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


@dataclass(frozen=True)
class DaliOptions:
    """How a DALI pipeline runs (not what it renders)."""

    threads: int = 2  # DALI CPU worker threads
    gpu: bool = False  # decode with nvJPEG and augment on the GPU (device="mixed")
    device_id: int = 0  # CUDA device when gpu
    half: bool = False  # fp16 output (only with gpu: the engine runs fp16 autocast)
    prefetch: int = 2  # batches DALI prepares ahead
    read_threads: int = 4  # threads reading encoded files (overlap file-system latency)
    # Run the pipeline (and its Python feed: file reads, parameter draws) on a background
    # thread, this many batches ahead of training; 0 runs it on the caller's thread.
    feed_ahead: int = 2
    # Views as channels_last NCHW tensors (rendered HWC, viewed without a copy), as the engine
    # trains on CUDA; None: on the GPU only.
    channels_last: bool | None = None


def _read(path: str) -> np.ndarray | None:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None


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


def _uses_pil_hue(spec: ViewSpec) -> bool:
    return spec.hue > YIQ_HUE_MAX


def _pil_hue_steps(hue: float) -> float:
    """torchvision's hue shift of a PIL image (``uint8(int32(hue * 255))``) in PIL's 8-bit hue
    units: a turn is 255 of them, and the shifted hue wraps at 256 (torchvision's uint8 sum)."""
    return float(int(hue * 255) % 256)


def _view_arrays(params: Sequence[ViewParams], spec: ViewSpec) -> list[np.ndarray]:
    """The drawn parameters of one view for a batch, as the arrays _VIEW_FIELDS names."""
    n = len(params)
    start, end = np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32)
    colour = np.tile(np.array([1.0, 1.0, 1.0, 0.0], np.float32), (n, 1))  # b, c, s, hue
    sigma, window = np.ones(n, np.float32), np.full(n, 3, np.int32)
    to_deg = _degrees_per_turn(spec)
    pil_hue = _uses_pil_hue(spec)
    for i, p in enumerate(params):
        left, top, right, bottom = p.box
        start[i], end[i] = (top, left), (bottom, right)
        if p.jitter is not None:
            _, b, c, s, h = p.jitter
            colour[i] = (b, c, s, _pil_hue_steps(h) if pil_hue else h * to_deg)
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


def _view_types(types: Any) -> tuple[list[Any], list[int]]:
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
    spec: ViewSpec | EvalSpec,
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
        if _uses_pil_hue(spec):
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


def _pretrain_graph(
    feed: _Feed, specs: tuple[ViewSpec, ViewSpec], gpu: bool, half: bool, nhwc: bool = False
):
    """(view 1, view 2, sample index) of a batch of encoded images (a DALI pipeline body)."""
    fn, types, _ = _ops()
    vt, vn = _view_types(types)
    k = len(_VIEW_FIELDS)
    outs = fn.external_source(
        source=feed,
        num_outputs=2 + 2 * k,
        batch=True,
        dtype=[types.UINT8, *vt, *vt, types.INT64],
        ndim=[1, *vn, *vn, 0],
    )
    img = _decode(fn, types, outs[0], gpu)
    # (AutoGraph, which rewrites this function for the conditionals, has no zip(strict=...))
    a1 = {name: outs[1 + i] for i, name in enumerate(_VIEW_FIELDS)}
    a2 = {name: outs[1 + k + i] for i, name in enumerate(_VIEW_FIELDS)}
    v1 = _render_view(img, a1, specs[0], gpu, half, nhwc)
    v2 = _render_view(img, a2, specs[1], gpu, half, nhwc)
    return v1, v2, outs[-1]


def _eval_graph(feed: _Feed, spec: EvalSpec, gpu: bool, half: bool):
    """(image, label, sample index): one resize of the region an evaluation transform keeps."""
    fn, types, _ = _ops()
    f = types.FLOAT
    encoded, start, end, flip, labels, idx = fn.external_source(
        source=feed,
        num_outputs=6,
        batch=True,
        dtype=[types.UINT8, f, f, types.INT32, types.INT64, types.INT64],
        ndim=[1, 1, 1, 0, 0, 0],
    )
    img = _decode(fn, types, encoded, gpu)
    v = fn.resize(
        img,
        roi_start=start,
        roi_end=end,
        size=[spec.height, spec.width],
        interp_type=_interp(types, spec.interpolation),
        antialias=True,
    )
    return _normalize(fn, types, v, flip, spec, half), labels, idx


class _Feed:
    """external_source's callable: the arrays of batch k of the current run, made by ``make``;
    StopIteration after the last one (DALI's end-of-data signal)."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.make: Callable[[np.ndarray], tuple] | None = None
        self.fed = 0

    def restart(self, batches: list[np.ndarray], make: Callable[[np.ndarray], tuple]) -> None:
        self.batches, self.make, self.fed = batches, make, 0

    def __call__(self) -> tuple:
        if self.make is None or self.fed >= len(self.batches):
            raise StopIteration
        out = self.make(self.batches[self.fed])
        self.fed += 1
        return out


def _to_torch(tl: Any, cuda: torch.device | None) -> Tensor:
    """Copy a DALI TensorList (uniform shapes) into a new torch tensor on its device."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    from nvidia.dali.tensors import TensorListGPU

    gpu = isinstance(tl, TensorListGPU)
    device = cuda if gpu and cuda is not None else torch.device("cpu")
    dense = tl.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if gpu else None)
    return out


class _Runner:
    """One DALI pipeline and its feed. Reused for the next run when the previous one was
    consumed to its end; rebuilt after an abandoned run (its prefetched batches would leak
    into the next) or a failure."""

    def __init__(self, graph: Callable[..., Any], batch_size: int, options: DaliOptions, **kw):
        self.graph, self.batch_size, self.options, self.kw = graph, batch_size, options, kw
        self.pipe: Any = None
        self.feed = _Feed()
        self.consumed = 0
        self.cuda = torch.device("cuda", options.device_id) if options.gpu else None

    def _build(self) -> None:
        dali = require_dali()
        o = self.options
        self.feed = _Feed()
        self.pipe = dali.pipeline_def(self.graph, enable_conditionals=True)(
            batch_size=self.batch_size,
            num_threads=max(1, o.threads),
            device_id=o.device_id if o.gpu else None,
            prefetch_queue_depth=max(1, o.prefetch),
            seed=0,  # nothing random happens inside DALI; parameters come from the feed
            feed=self.feed,
            gpu=o.gpu,
            half=o.half and o.gpu,
            **self.kw,
        )
        self.pipe.build()

    def start(self, batches: list[np.ndarray], make: Callable[[np.ndarray], tuple]) -> None:
        reuse = self.pipe is not None and self.consumed == len(self.feed.batches)
        if reuse:
            try:
                self.pipe.run()  # the feed is exhausted: this only collects the end signal
                reuse = False
            except StopIteration:
                self.pipe.reset()
        if not reuse:
            self._build()
        self.feed.restart(batches, make)
        self.consumed = 0

    def next(self) -> list[Tensor]:
        outs = self.pipe.run()
        self.consumed += 1
        return [_to_torch(t, self.cuda) for t in outs]

    def pending(self) -> list[np.ndarray]:
        """Batches handed to DALI and not yet returned (the failing one first)."""
        return self.feed.batches[self.consumed : max(self.feed.fed, self.consumed + 1)]

    def drop(self) -> None:
        self.pipe = None


def _probe_graph(feed: _Feed, gpu: bool, half: bool):
    fn, types, _ = _ops()
    (encoded,) = fn.external_source(
        source=feed, num_outputs=1, batch=True, dtype=[types.UINT8], ndim=[1]
    )
    return _decode(fn, types, encoded, gpu)


def dali_gpu_problem(device_id: int) -> str | None:
    """Why DALI cannot decode on GPU ``device_id`` (None when it can): one tiny JPEG through a
    ``mixed`` pipeline. An importable DALI built for another CUDA (the cuda130 wheel under a
    CUDA 12 driver) fails here instead of at the first training batch."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    jpeg = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    try:
        runner = _Runner(
            _probe_graph, 1, DaliOptions(threads=1, prefetch=1, gpu=True, device_id=device_id)
        )
        runner.start([np.array([0])], functools.partial(_one, [jpeg]))
        (out,) = runner.next()
        if tuple(out.shape) != (1, 16, 16, 3):
            return f"the probe decoded to shape {tuple(out.shape)}"
    except Exception as e:  # noqa: BLE001 - any failure means: do not train on DALI here
        return _decoder_message(e)
    return None


def dali_decode_failures(
    paths: Sequence[str], gpu: bool = False, device_id: int = 0
) -> dict[str, str]:
    """The files among ``paths`` that DALI's decoder rejects, with its message: the CPU decoder,
    or nvJPEG (``gpu``) — a loader must probe with the decoder it trains with, since nvJPEG
    rejects some files that the CPU decoder accepts.

    One image per iteration; a failed iteration rebuilds the pipeline (failures are rare)."""
    failures: dict[str, str] = {}
    todo = list(paths)
    opts = DaliOptions(threads=1, prefetch=1, gpu=gpu, device_id=device_id)
    while todo:
        runner = _Runner(_probe_graph, 1, opts)
        data = [_read(p) for p in todo]
        bad = [p for p, d in zip(todo, data, strict=True) if d is None]
        failures.update({p: "cannot read the file" for p in bad})
        todo = [p for p, d in zip(todo, data, strict=True) if d is not None]
        readable = [d for d in data if d is not None]
        runner.start([np.array([k]) for k in range(len(todo))], functools.partial(_one, readable))
        for done in range(len(todo)):
            try:
                runner.next()
            except RuntimeError as e:
                failures[todo[done]] = _decoder_message(e)
                todo = todo[done + 1 :]
                break
        else:
            todo = []
    return failures


def _one(data: list[np.ndarray], k: np.ndarray) -> tuple:
    return ([data[int(k[0])]],)


def _decoder_message(e: BaseException) -> str:
    """DALI's own reason follows "encountered:" (the decoder library prints its detail to
    stderr); the rest of the message is a graph traceback."""
    text = str(e)
    tail = text.split("encountered:", 1)[1] if "encountered:" in text else text
    lines = [ln.strip(" :") for ln in tail.splitlines() if ln.strip(" :")]
    return re.sub(r" sample #\d+", "", lines[0]) if lines else type(e).__name__


def _order(n: int, rank: int, world: int, seed: int, epoch: int) -> list[int]:
    """The rank's sample indices of ``epoch``: DistributedSampler(shuffle, drop_last) — the
    torchvision backend's sampler, so both backends visit the same samples in the same order."""
    sampler: DistributedSampler[int] = DistributedSampler(
        range(n),  # type: ignore[arg-type]
        num_replicas=world,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def _next_usable(usable: np.ndarray) -> np.ndarray:
    """For every index, the first usable index at or after it (cyclically)."""
    good = np.flatnonzero(usable)
    if len(good) == 0:
        return np.full(len(usable), -1, np.int64)
    pos = np.searchsorted(good, np.arange(len(usable)))
    return good[np.where(pos == len(good), 0, pos)].astype(np.int64)


class _Ahead:
    """Calls ``produce`` ``n`` times on a background thread, at most ``depth`` results ahead of
    ``get``: DALI's ``pipe.run()`` runs the external source's Python callback (file reads,
    per-sample draws) on the thread that calls it, so on the training thread the GPU would wait
    for Python. An exception ends the thread and is raised by the ``get`` that reaches it."""

    def __init__(self, produce: Callable[[], Any], n: int, depth: int):
        self._q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce, n), daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], Any], n: int) -> None:
        for _ in range(n):
            if self._stop.is_set():
                return
            try:
                item: tuple[bool, Any] = (True, produce())
            except BaseException as e:  # noqa: BLE001 - handed to the consumer as it is
                item = (False, e)
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return

    def get(self) -> Any:
        ok, value = self._q.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop producing (after the batch in progress) and wait for the thread."""
        self._stop.set()
        self._thread.join()


class _Inline:
    """``_Ahead``'s interface on the caller's thread (``feed_ahead: 0``)."""

    def __init__(self, produce: Callable[[], Any]):
        self.get, self.close = produce, lambda: None


class DaliPretrainLoader:
    """Batches of two views for one rank: the torchvision backend's PretrainLoader interface
    (``steps_per_epoch``, ``indices(epoch)``, ``epoch(epoch, start_batch)``, ``substituted``)
    and its sample order, epoch length and per-sample parameters, rendered by DALI.

    ``index`` must be the index of ``samples`` (same files, same order). ``last_indices``
    holds the sample indices of the batch last yielded (as DALI returned them).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        spec_pair: tuple[ViewSpec, ViewSpec],
        batch_size: int,
        index: ImageIndex,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        options: DaliOptions = DaliOptions(),
    ):
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"bad loader geometry: batch {batch_size}, rank {rank}, world {world}")
        if len(index) != len(samples):
            raise ValueError(f"index has {len(index)} files, the sample list {len(samples)}")
        self.paths = [p for p, _ in samples]
        self.specs, self.batch_size = spec_pair, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.index = index
        self.usable = index.usable().copy()
        if not self.usable.any():
            raise UserError(f"none of the {len(samples)} images can be decoded ({samples[0][0]}…)")
        self.subst = _next_usable(self.usable)
        per_rank = len(samples) // world
        self.steps_per_epoch = per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{len(samples)} images over {world} rank(s) give {per_rank} per rank, fewer "
                f"than one batch of {batch_size}: use more images, a smaller train.batch_size "
                f"or fewer GPUs"
            )
        self.substituted = 0  # samples replaced by the next usable image, seen by this rank
        self.last_indices: Tensor | None = None
        self._files = ThreadPoolExecutor(max_workers=max(1, options.read_threads))
        self._nhwc = options.gpu if options.channels_last is None else options.channels_last
        self._runner = _Runner(
            _pretrain_graph, batch_size, options, specs=spec_pair, nhwc=self._nhwc
        )

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch`` (steps_per_epoch × batch_size of them)."""
        order = _order(len(self.paths), self.rank, self.world, self.seed, epoch)
        return order[: self.steps_per_epoch * self.batch_size]

    def epoch(
        self, epoch: int, start_batch: int = 0, end_batch: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (v1, v2) batches (B×3×H×W, float32, or float16 with options.half) of
        ``epoch`` from micro-batch ``start_batch`` up to ``end_batch`` (default: the epoch's
        end); the remaining batches equal those of an uninterrupted epoch. A caller that will
        stop early says so with ``end_batch``: the pipeline is then consumed to its end and
        reused by the next epoch instead of rebuilt."""
        end = self.steps_per_epoch if end_batch is None else min(end_batch, self.steps_per_epoch)
        if not 0 <= start_batch <= end:
            raise ValueError(f"start_batch {start_batch} outside 0..{end}")
        keys = np.asarray(self.indices(epoch), np.int64)
        b = self.batch_size
        batches = [keys[k * b : (k + 1) * b] for k in range(start_batch, end)]
        make = functools.partial(self._batch, epoch)
        done = 0
        ahead = self._runner.options.feed_ahead
        while done < len(batches):
            self._runner.start(batches[done:], make)
            feed = (
                _Ahead(self._runner.next, len(batches) - done, ahead)
                if ahead > 0
                else _Inline(self._runner.next)
            )
            try:
                for k in range(done, len(batches)):
                    try:
                        v1, v2, idx = feed.get()
                    except RuntimeError as e:
                        feed.close()
                        self._recover(e)
                        break
                    self.substituted += int(np.count_nonzero(self.subst[batches[k]] != batches[k]))
                    self.last_indices = idx
                    done = k + 1
                    if self._nhwc:  # B×H×W×3 → B×3×H×W with channels_last strides, no copy
                        v1, v2 = v1.permute(0, 3, 1, 2), v2.permute(0, 3, 1, 2)
                    yield v1, v2
            finally:
                feed.close()  # an abandoned epoch (max_steps, a signal) stops the thread too

    def close(self) -> None:
        """Release the pipeline (and its memory); the next epoch builds a new one."""
        self._runner.drop()

    def _batch(self, epoch: int, keys: np.ndarray) -> tuple:
        """The feed's arrays for the samples ``keys``: encoded files (each replaced by the next
        usable one where needed) and both views' parameters, drawn as the torchvision backend
        draws them."""
        sub = self.subst[keys]
        data = list(self._files.map(_read, [self.paths[i] for i in sub.tolist()]))
        while any(d is None for d in data):  # vanished or unreadable since the index was built
            for i, d in zip(sub.tolist(), data, strict=True):
                if d is None:
                    self._mark_bad(i, "cannot read the file")
            sub = self.subst[keys]
            data = list(self._files.map(_read, [self.paths[i] for i in sub.tolist()]))
        p1: list[ViewParams] = []
        p2: list[ViewParams] = []
        sizes = zip(self.index.width[sub].tolist(), self.index.height[sub].tolist(), strict=True)
        for key, (w, h) in zip(keys.tolist(), sizes, strict=True):
            rng = sample_rng(self.seed, epoch, key)
            p1.append(draw_params(w, h, self.specs[0], rng))
            p2.append(draw_params(w, h, self.specs[1], rng))
        v1 = _view_arrays(p1, self.specs[0])
        v2 = _view_arrays(p2, self.specs[1])
        return (data, *v1, *v2, keys.astype(np.int64))

    def _mark_bad(self, i: int, reason: str) -> None:
        self.usable[i] = False
        self.subst = _next_usable(self.usable)
        msg = escape(f"{self.paths[i]}: {reason}; using the next image instead")
        log.console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True)
        if not self.usable.any():
            raise UserError(f"none of the {len(self.paths)} images can be decoded")

    def _recover(self, err: RuntimeError) -> None:
        """After DALI failed on a batch: find the files it cannot decode among those it was
        given, skip them from now on, or re-raise when none of them is at fault."""
        pending = self._runner.pending()
        self._runner.drop()
        rows = sorted({int(i) for b in pending for i in self.subst[b].tolist()})
        o = self._runner.options  # probe on the decoder that failed (nvJPEG on a GPU)
        failures = dali_decode_failures([self.paths[i] for i in rows], o.gpu, o.device_id)
        if not failures:
            raise err
        for i in rows:
            if self.paths[i] in failures:
                self._mark_bad(i, f"DALI cannot decode it: {failures[self.paths[i]]}")


def eval_region(
    width: int, height: int, spec: EvalSpec, rng: random.Random
) -> tuple[tuple[float, float, float, float], bool]:
    """(box (left, top, right, bottom) in source pixels, flip) that ``spec`` keeps of an image.

    One resize of this box to height×width equals torchvision's resize-then-crop: the output
    grid of a crop of the resized image is the resized grid, restricted — same filter scale,
    same sample positions.
    """
    if spec.crop == "none":
        return (0.0, 0.0, float(width), float(height)), False
    if spec.crop == "random":
        # torchvision's RandomResizedCrop default aspect range (3/4, 4/3), as the tv backend
        left, top, right, bottom = crop_box(
            width, height, ViewSpec(size=spec.height, scale=spec.scale), rng
        )
        return (float(left), float(top), float(right), float(bottom)), rng.random() < spec.flip_p
    # T.Resize(int): shorter side → resize, longer side truncated; T.CenterCrop: rounded offsets
    short, long = min(width, height), max(width, height)
    new_long = int(spec.resize * long / short)
    nw, nh = (spec.resize, new_long) if width <= height else (new_long, spec.resize)
    top = int(round((nh - spec.height) / 2.0))
    left = int(round((nw - spec.width) / 2.0))
    sx, sy = width / nw, height / nh
    return (left * sx, top * sy, (left + spec.width) * sx, (top + spec.height) * sy), False


class DaliEvalLoader:
    """Evaluation batches (images B×3×H×W, labels, sample indices) — what a DataLoader over
    the torchvision backend's ``EvalDataset(samples, spec)`` yields without shuffling: the
    samples at ``order`` (default: all) in that order, the last batch partial.

    Files the index marks unusable raise DecodeError here, before any work (evaluation must not
    silently change its data set). ``set_epoch`` reseeds "random" specs (linear-eval training):
    draws come from ``sample_rng(seed, epoch, index)``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        spec: EvalSpec,
        batch_size: int,
        index: ImageIndex,
        order: Sequence[int] | None = None,
        seed: int = 0,
        options: DaliOptions = DaliOptions(),
    ):
        if len(index) != len(samples):
            raise ValueError(f"index has {len(index)} files, the sample list {len(samples)}")
        self.samples, self.spec, self.batch_size = list(samples), spec, batch_size
        self.order = np.asarray(range(len(samples)) if order is None else order, np.int64)
        self.index, self.seed, self.epoch = index, seed, 0
        bad = self.order[~index.usable()[self.order]]
        if len(bad):
            first = int(bad[0])
            kind = KINDS[index.kind[first]]
            raise DecodeError(
                samples[first][0],
                f"{kind} ({index.reasons.get(index.rel[first], '')}); {len(bad)} of the "
                f"{len(self.order)} images are unusable (`sslctl data check` lists them)",
            )
        self._files = ThreadPoolExecutor(max_workers=max(1, options.read_threads))
        self._runner = _Runner(_eval_graph, batch_size, options, spec=spec)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        b = self.batch_size
        batches = [self.order[k : k + b] for k in range(0, len(self.order), b)]
        self._runner.start(batches, self._batch)
        for _ in batches:
            try:
                x, labels, idx = self._runner.next()
            except RuntimeError as e:
                pending = self._runner.pending()
                self._runner.drop()
                o = self._runner.options
                failures = dali_decode_failures(
                    [self.samples[i][0] for batch in pending for i in batch.tolist()],
                    o.gpu,
                    o.device_id,
                )
                for path, why in failures.items():
                    raise DecodeError(path, f"DALI cannot decode it: {why}") from e
                raise
            yield x, labels, idx

    def _batch(self, keys: np.ndarray) -> tuple:
        paths = [self.samples[i][0] for i in keys.tolist()]
        data = list(self._files.map(_read, paths))
        for path, d in zip(paths, data, strict=True):
            if d is None:
                raise DecodeError(path, "cannot read the file")
        n = len(keys)
        start, end = np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32)
        flip = np.zeros(n, np.int32)
        for j, i in enumerate(keys.tolist()):
            w, h = int(self.index.width[i]), int(self.index.height[i])
            box, flip[j] = eval_region(w, h, self.spec, sample_rng(self.seed, self.epoch, i))
            start[j], end[j] = (box[1], box[0]), (box[3], box[2])
        labels = np.array([self.samples[i][1] for i in keys.tolist()], np.int64)
        return data, start, end, flip, labels, keys.astype(np.int64)
