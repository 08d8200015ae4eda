"""Tiny real image folders and a tiny profile for end-to-end fault tests through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslctl import checkpoint

ROOT = Path(__file__).resolve().parents[1]

TINY_PROFILE = """
description: "tiny fault-test profile"
model: {arch: resnet18, small_stem: true, sync_bn: false, proj_hidden: 64, proj_dim: 32, pred_hidden: 64}
method: {name: triplet, multires: true, online_res_min: 12, online_res_max: 16, target_res_min: 14, target_res_max: 16}
optim: {name: lars, lr: 0.5, warmup_epochs: 1}
train: {epochs: 3, batch_size: 12, accumulate: 1, precision: fp32, seed: 0, log_every: 1}
data: {backend: torchvision, image_size: 16, workers: 0, pin_memory: false}
ckpt: {every_epochs: 1, keep_last: 2, every_steps: 1}
"""


def make_images(root: Path, n: int = 48, classes: int = 3, size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root


def write_profile(path: Path, extra: str = "") -> Path:
    path.write_text(TINY_PROFILE + extra)
    return path


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sslctl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.fault_worker", *args]


def run_cli(
    *args: str, timeout: int = 600, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        sslctl_cmd(*args),
        cwd=ROOT,
        env={**env(), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_safetensors(checkpoint.resolve(run).weights)[0]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
