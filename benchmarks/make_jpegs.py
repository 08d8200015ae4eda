"""Write ImageNet-sized JPEGs (about 500×375, quality 90) with natural-image-like content.

Decoding speed depends on how much detail a JPEG holds, so flat test images would flatter the
decoder: each image here sums colour noise at several scales (a 1/f-like spectrum, as natural
photographs have) and is saved with 4:2:0 chroma subsampling like most camera JPEGs.

    python benchmarks/make_jpegs.py OUT_DIR [--n 200] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _natural_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    acc = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((3, 1.0), (8, 0.6), (24, 0.4), (80, 0.3), (250, 0.25)):
        coarse = rng.normal(0.0, 1.0, (max(2, cells * height // width), cells, 3))
        layer = np.stack(
            [
                np.asarray(
                    Image.fromarray(coarse[..., c].astype(np.float32), mode="F").resize(
                        (width, height), Image.Resampling.BICUBIC
                    )
                )
                for c in range(3)
            ],
            axis=-1,
        )
        acc += weight * layer
    acc += _edges(rng, width, height) + rng.normal(0.0, 0.08, acc.shape).astype(np.float32)
    lo, hi = np.percentile(acc, (1, 99))
    rgb = np.clip((acc - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def _edges(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Sharp-edged shapes (objects' outlines): the detail that costs a JPEG decoder the most."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 10))):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return np.asarray(canvas, np.float32) / 255.0 * 1.5


def make_jpegs(
    out_dir: Path, n: int = 200, width: int = 500, height: int = 375, seed: int = 0
) -> list[Path]:
    """Write ``n`` JPEGs into ``out_dir`` (portrait every fourth, like ImageNet's mix)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (height, width) if i % 4 == 3 else (width, height)
        path = out_dir / f"img_{i:05d}.jpg"
        _natural_like(rng, w, h).save(path, "JPEG", quality=90, subsampling="4:2:0")
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    paths = make_jpegs(args.out_dir, args.n, seed=args.seed)
    size = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    print(f"wrote {len(paths)} JPEGs to {args.out_dir} (mean {size:.0f} KiB)")


if __name__ == "__main__":
    main()
