"""Two-view BYOL augmentation throughput per CPU core on ImageNet-sized JPEGs.

Compares (a) the naive torchvision recipe — transforms.v1 on PIL images, whose GaussianBlur
turns the image into a tensor and runs a 23-tap blur (and a transforms.v2 variant that works on
uint8 tensors throughout) — with (b) sslctl's TwoViewTransform, and (c) JPEG decoding alone.
The 23-tap kernel of a small σ holds subnormal floats, which make x86 CPUs multiply up to 10×
slower; a second v1 row flushes them to zero (torch.set_flush_denormal) to separate the two.
Every pipeline includes decoding; one image in = two 224×224 views out.

Single process, one thread (torch.set_num_threads(1)), so images/s is per core. Throughput is
measured on process CPU time, which other processes on a shared machine do not inflate; wall
time is reported beside it.

    python benchmarks/bench_augment.py [--images DIR] [--n 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision import transforms as T
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_jpegs beside this file

from make_jpegs import make_jpegs  # noqa: E402

from sslctl.data.readers import load_rgb  # noqa: E402
from sslctl.data.tv import TwoViewTransform  # noqa: E402
from sslctl.data.views import IMAGENET_MEAN, IMAGENET_STD, byol_views  # noqa: E402


def naive_v1(size: int, blur_p: float, solarize_p: float) -> T.Compose:
    bicubic = T.InterpolationMode.BICUBIC
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_p),
            T.RandomSolarize(128, p=solarize_p),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def naive_v2(size: int, blur_p: float, solarize_p: float) -> v2.Compose:
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(
                size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC
            ),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_p),
            v2.RandomSolarize(128, p=solarize_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def pipelines(size: int) -> dict[str, Callable[[str, int], object]]:
    a1, a2 = naive_v1(size, 1.0, 0.0), naive_v1(size, 0.1, 0.2)
    b1, b2 = naive_v2(size, 1.0, 0.0), naive_v2(size, 0.1, 0.2)
    ours = TwoViewTransform(*byol_views(size))

    def run_v1(path: str, i: int) -> object:
        img = load_rgb(path)
        return a1(img), a2(img)

    def run_v1_flush(path: str, i: int) -> object:
        # For small σ, some of the 23 taps are subnormal floats, which x86 multiplies very
        # slowly; flushing them to zero shows what the blur costs without that penalty.
        torch.set_flush_denormal(True)
        try:
            return run_v1(path, i)
        finally:
            torch.set_flush_denormal(False)

    def run_v2(path: str, i: int) -> object:
        img = load_rgb(path)
        return b1(img), b2(img)

    return {
        "naive torchvision v1 (tensor blur 23)": run_v1,
        "naive torchvision v1, subnormals flushed": run_v1_flush,
        "naive torchvision v2 (uint8 tensors, blur 23)": run_v2,
        "sslctl TwoViewTransform": lambda path, i: ours(load_rgb(path), random.Random(i)),
        "JPEG decode alone": lambda path, i: load_rgb(path),
    }


def measure(fn: Callable[[str, int], object], paths: list[str]) -> dict[str, float]:
    for i, p in enumerate(paths[:5]):  # warm-up: file cache, lazy imports, allocator
        fn(p, i)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i, p in enumerate(paths):
        fn(p, i)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "img_per_s_per_core": len(paths) / cpu,
        "ms_per_img_cpu": 1000 * cpu / len(paths),
        "img_per_s_wall": len(paths) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, help="folder of JPEGs (default: generate --n)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.images is None:
            make_jpegs(Path(tmp), args.n)
        folder = args.images or Path(tmp)
        paths = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if not paths:
            sys.exit(f"no JPEGs in {folder}")
        results = {name: measure(fn, paths) for name, fn in pipelines(args.size).items()}
    naive = results["naive torchvision v1 (tensor blur 23)"]["img_per_s_per_core"]
    source = folder if args.images else "make_jpegs.py"
    print(f"{len(paths)} JPEGs from {source}, two {args.size}² views each, 1 thread")
    print(
        f"{'pipeline':48s} {'img/s/core':>10s} {'ms/img':>8s} {'img/s wall':>10s} {'vs naive':>8s}"
    )
    for name, r in results.items():
        print(
            f"{name:48s} {r['img_per_s_per_core']:10.1f} {r['ms_per_img_cpu']:8.2f} "
            f"{r['img_per_s_wall']:10.1f} {r['img_per_s_per_core'] / naive:7.2f}×"
        )
    if args.json:
        record = {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__,
            "images": len(paths),
            "size": args.size,
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
