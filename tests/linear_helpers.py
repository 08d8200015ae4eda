"""Tiny labelled image folders and resnet18 weight files for the linear-eval and kNN tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sslctl import checkpoint
from sslctl.backbones import build_backbone

# One clearly different colour per class: a random backbone's features already separate them.
COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 40)]


def write_png(path: Path, colour: tuple[int, int, int], seed: int, size: int = 16) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pix = np.array(colour, np.float32) + rng.normal(0, 12, (size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8)).save(path)


def make_split(root: Path, per_class: int, classes: int = 3, seed: int = 0) -> Path:
    """root/<c>/<i>.png with per_class noisy images of class colour c."""
    for c in range(classes):
        for i in range(per_class):
            write_png(root / f"c{c}" / f"{i:03d}.png", COLOURS[c], seed * 10_000 + c * 100 + i)
    return root


def make_dataset(root: Path, train: int = 8, val: int = 3, classes: int = 3) -> Path:
    make_split(root / "train", train, classes, seed=1)
    make_split(root / "val", val, classes, seed=2)
    return root


def make_weights(path: Path, arch: str = "resnet18", seed: int = 1) -> Path:
    """An extracted backbone (torchvision key names) with a small-image stem (ResNets); seed 1,
    so it differs from the random-init baseline (seed 0)."""
    torch.manual_seed(seed)
    net = build_backbone(arch, small_stem=arch != "convnet4")
    checkpoint.save_safetensors(path, net.state_dict(), {"format": "sslctl-backbone"})
    return path


# demo-cpu (convnet4, AdamW) made small enough for seconds; the image size is the caller's.
TINY_PRETRAIN = [
    "model.proj_hidden=32",
    "model.proj_dim=16",
    "model.pred_hidden=32",
    "train.batch_size=12",
    "train.epochs=1",
    "train.log_every=1",
    "data.workers=0",
    "eval.knn_every=0",
    "ckpt.every_epochs=1",
]


def make_run(run: Path, images: Path, image_size: int = 32) -> Path:
    """A real (tiny) demo-cpu pre-training run on ``images`` at ``image_size`` px: its
    checkpoints carry that config, as any sslctl run's do."""
    from sslctl import api

    sets = [*TINY_PRETRAIN, f"data.image_size={image_size}"]
    res = api.pretrain("demo-cpu", run, images, sets, fresh=True)
    assert res.fit.checkpoint is not None
    return run


def tiny_sets(*extra: str) -> list[str]:
    """--set overrides that make linear-demo-cpu run in seconds on 16-px images."""
    return [
        "data.image_size=16",
        "data.resize=16",
        "data.workers=0",
        "data.eval_batch_size=16",
        "linear.batch_size=8",
        "linear.epochs=2",
        "linear.warmup_epochs=1",
        "linear.log_every=1",
        "cached.epochs=30",
        "cached.batch_size=8",
        "cached.warmup_epochs=1",
        "knn.k=5",
        *extra,
    ]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny convolutions on a shared 2-core machine: a second intra-op thread only spins
    (measured: the standard-protocol test takes 20 s with 2 threads, 3 s with one).
    tests/conftest.py now pins one thread for the whole session; this per-test copy stays only
    while test_linear*.py still import it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def separable(n_per_class: int, classes: int, dim: int = 16, seed: int = 0):
    """Clusters around orthogonal directions: each class is linearly separable from the others."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 5
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g) * 0.5
    return x, y
