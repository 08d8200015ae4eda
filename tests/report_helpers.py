"""Short real pre-training runs (the engine in this process) for the report and TensorBoard
tests, and reading a PNG's panels back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslctl import config, dist
from sslctl.engine.fit import FitRequest, FitResult, fit
from tests.engine_helpers import TensorLoader

CPU = dist.DistInfo(0, 1, 0, torch.device("cpu"))

# demo-cpu (convnet4, Triplet, AdamW) on 32-px tensors: 3 steps per epoch, 4 epochs, every step
# logged, the kNN monitor after every epoch.
TINY = [
    "model.proj_hidden=64",
    "model.proj_dim=32",
    "model.pred_hidden=64",
    "train.batch_size=16",
    "train.epochs=4",
    "train.log_every=1",
    "eval.knn_every=1",
    "ckpt.every_epochs=2",
    "optim.warmup_epochs=1",
]


def tiny_cfg(*extra: str) -> config.Config:
    return config.load("demo-cpu", [*TINY, *extra])


def fake_knn(start: float = 20.0, slope: float = 7.5):
    """A stand-in for the kNN monitor (the real one reads labelled folders): rises, then dips,
    so that the final and the best value differ."""
    calls: list[int] = []

    def monitor(backbone: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        n = len(calls)
        top1 = start + slope * n if n < 4 else start + slope * 2.5
        return {"knn_top1": top1, "knn_top5": min(100.0, 2 * top1)}

    return monitor


def short_run(
    run: Path, *extra: str, max_steps: int | None = None, seed: int = 0, knn: Any = None
) -> FitResult:
    cfg = tiny_cfg(*extra)
    torch.manual_seed(seed)
    loader = TensorLoader(48, cfg.train.batch_size, size=32, seed=seed)
    monitor = knn if knn is not None else fake_knn()
    return fit(FitRequest(cfg, run, loader, "auto", max_steps, monitor=monitor), CPU)


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def colour_pixels(pix: np.ndarray, box: list[int], hex_colour: str, tol: int = 30) -> int:
    """Pixels inside ``box`` (left, top, right, bottom) within ``tol`` of a colour."""
    left, top, right, bottom = box
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    region = pix[top:bottom, left:right]
    return int((np.abs(region - rgb).max(axis=2) <= tol).sum())
