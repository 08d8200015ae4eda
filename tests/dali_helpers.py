"""Rendering the same views with DALI (CPU) and torchvision, for the backend-agreement tests.
Import it after ``pytest.importorskip("nvidia.dali")``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sslctl.data import dali as D
from sslctl.data.dali_runner import DaliOptions
from sslctl.data.index import build_index, index_path
from sslctl.data.tv import PretrainLoader
from sslctl.data.views import IMAGENET_MEAN, IMAGENET_STD, ViewSpec

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
CPU = DaliOptions(threads=2, read_threads=2)  # CPU pipelines: run wherever DALI is installed


def index_of(samples: list[tuple[str, int]], root: Path):
    return build_index([p for p, _ in samples], root, index_path(root)).index


def uint8_views(x: torch.Tensor) -> np.ndarray:
    """Normalised B×3×H×W views back to uint8-scale B×H×W×3 floats."""
    return ((x.float() * STD + MEAN) * 255.0).permute(0, 2, 3, 1).numpy()


def render_both(
    path: Path, n: int, specs: tuple[ViewSpec, ViewSpec], seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """([dali v1, v2], [tv v1, v2]) of n samples that all read the image at ``path``."""
    samples = [(str(path), 0)] * n
    dl = D.DaliPretrainLoader(
        samples, specs, n, index_of(samples, path.parent), seed=seed, options=CPU
    )
    tl = PretrainLoader(samples, specs, n, seed=seed)
    d = next(iter(dl.epoch(0)))
    t = next(iter(tl.epoch(0)))
    return [uint8_views(v) for v in d], [uint8_views(v) for v in t]
