"""DALI pipeline plumbing: options, the Python feed, running a graph, reading its outputs.

``Runner`` owns one pipeline and its ``Feed`` (``external_source``'s callable, which makes each
batch's arrays in Python); ``Ahead`` runs it on a background thread a few batches ahead of
training. ``dali_gpu_problem`` and ``dali_decode_failures`` probe DALI's decoders.
"""

from __future__ import annotations

import functools
import queue
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sslctl.data.dali_graph import probe_graph, require_dali


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


def read_file(path: str) -> np.ndarray | None:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None


class Feed:
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


class Runner:
    """One DALI pipeline and its feed. Reused for the next run when the previous one was
    consumed to its end; rebuilt after an abandoned run (its prefetched batches would leak
    into the next) or a failure."""

    def __init__(self, graph: Callable[..., Any], batch_size: int, options: DaliOptions, **kw):
        self.graph, self.batch_size, self.options, self.kw = graph, batch_size, options, kw
        self.pipe: Any = None
        self.feed = Feed()
        self.consumed = 0
        self.cuda = torch.device("cuda", options.device_id) if options.gpu else None

    def _build(self) -> None:
        dali = require_dali()
        o = self.options
        self.feed = Feed()
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
        runner = Runner(
            probe_graph, 1, DaliOptions(threads=1, prefetch=1, gpu=True, device_id=device_id)
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
        runner = Runner(probe_graph, 1, opts)
        data = [read_file(p) for p in todo]
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


class Ahead:
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


class Inline:
    """``Ahead``'s interface on the caller's thread (``feed_ahead: 0``)."""

    def __init__(self, produce: Callable[[], Any]):
        self.get, self.close = produce, lambda: None
