"""Tiny generated re-ID test sets and a resnet18 backbone file for the eval-reid tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from sslctl.backbones import build_backbone


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 48)) -> None:
    """A small random JPEG (w×h); a seed per identity keeps same-id images alike."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(4, 2, 3))
    noise = rng.integers(-20, 20, size=(size[1], size[0], 3))
    # block pattern upsampled to (h, w) by index repetition, any size
    rows = np.arange(size[1]) * 4 // size[1]
    cols = np.arange(size[0]) * 2 // size[0]
    pix = base[rows][:, cols] + noise
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_market(root: Path, n_ids: int = 4) -> Path:
    """Market-1501 tree: query/ (one image per id, camera 1) and bounding_box_test/.

    Gallery per id: two images from camera 2 (positives) and one from camera 1 (junk: same id,
    same camera), plus two distractors (0000), one junk image (-1) and non-image clutter.
    """
    q, g = root / "query", root / "bounding_box_test"
    for pid in range(1, n_ids + 1):
        write_image(q / f"{pid:04d}_c1s1_000{pid}01_00.jpg", seed=pid)
        write_image(g / f"{pid:04d}_c2s1_000{pid}02_00.jpg", seed=pid * 7 + 1)
        write_image(g / f"{pid:04d}_c2s2_000{pid}03_00.jpg", seed=pid * 7 + 2)
        write_image(g / f"{pid:04d}_c1s1_000{pid}04_00.jpg", seed=pid * 7 + 3)
    write_image(g / "0000_c3s1_000001_00.jpg", seed=101)
    write_image(g / "0000_c4s1_000002_00.jpg", seed=102)
    write_image(g / "-1_c5s1_000003_00.jpg", seed=103)
    (g / "Thumbs.db").write_bytes(b"not an image")
    (g / ".DS_Store").write_bytes(b"\0")
    return root


def make_backbone(path: Path, seed: int = 0) -> Path:
    """resnet18 weights with torchvision key names (no fc), as an extracted backbone file."""
    torch.manual_seed(seed)
    net = build_backbone("resnet18")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path))
    return path


def make_sysu(root: Path, n_ids: int = 3, flat: bool = False) -> Path:
    """SYSU-30k test tree: query/<id>/<id>_c2_2.jpg, gallery/<id>/<id>_c1_1.jpg and two
    distractors in gallery/0000others/ (``flat``: every file directly in query/ and gallery/)."""
    for pid in range(28311, 28311 + n_ids):
        token = f"{pid:09d}"
        sub = "" if flat else token
        write_image(root / "query" / sub / f"{token}_c2_2.jpg", seed=pid % 100)
        write_image(root / "gallery" / sub / f"{token}_c1_1.jpg", seed=pid % 100 + 50)
    for i in range(2):
        sub = "" if flat else "0000others"
        write_image(root / "gallery" / sub / f"0000others_c1_{i}.jpg", seed=200 + i)
    return root


def write_features(
    path: Path, feats: list, ids: list[int], cams: list[int], meta: dict[str, str] | None = None
) -> Path:
    """A features file as another tool would write it: the three tensors, optional metadata."""
    tensors = {
        "features": torch.as_tensor(feats, dtype=torch.float32),
        "ids": torch.as_tensor(ids, dtype=torch.int64),
        "cameras": torch.as_tensor(cams, dtype=torch.int64),
    }
    save_file(tensors, str(path), metadata=meta)
    return path
