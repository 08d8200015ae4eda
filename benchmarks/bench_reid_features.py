"""eval-reid feature extraction throughput: ResNet-50, 256×128, image + flip, through the real
path (sslctl.eval.features.extract_features over ReidImages: PIL decode + bicubic resize in
DataLoader workers, forward under the given precision, fusion, L2-normalisation).

    python benchmarks/bench_reid_features.py --n 4096 --precision bf16 fp32 --workers 8

Makes --n JPEG person-crop stand-ins (128×64, random content) in a temporary folder. A first
pass over a small subset warms up the kernels; images/s counts source images (each is
encoded twice with flip on).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslctl.backbones import build_backbone
from sslctl.eval.features import extract_features
from sslctl.eval.reid.layouts import ReidImages


def _crops(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = root / f"{i // 4:04d}_c{1 + i % 6}_{i:06d}.jpg"
        small = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)  # smooth blobs, JPEG-friendly
        Image.fromarray(small).resize((64, 128), Image.BILINEAR).save(p, quality=90)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    model = build_backbone("resnet50")
    rows = []
    print(f"{'device':24} {'prec':5} {'images':>7} {'workers':>7} {'img/s':>8} {'s':>7}")
    with tempfile.TemporaryDirectory() as d:
        paths = _crops(Path(d), a.n)
        for precision in a.precision:
            kw = dict(
                batch_size=a.batch,
                device=device,
                precision=precision,
                flip=True,
                normalize=True,
                workers=a.workers,
            )
            extract_features(model, ReidImages(paths[: a.batch * 2]), **kw)  # warm-up
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            feats = extract_features(model, ReidImages(paths), **kw)
            secs = time.perf_counter() - t0
            assert feats.shape == (a.n, 2048) and torch.isfinite(feats).all()
            r = {
                "device": name,
                "precision": precision,
                "images": a.n,
                "workers": a.workers,
                "batch": a.batch,
                "seconds": secs,
                "img_per_s": a.n / secs,
            }
            rows.append(r)
            print(
                f"{name:24.24} {precision:5} {a.n:>7} {a.workers:>7} {r['img_per_s']:>8.1f} {secs:>7.2f}",
                flush=True,
            )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
