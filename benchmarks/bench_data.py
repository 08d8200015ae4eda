"""Two-view pre-training pipeline throughput: torchvision DataLoader vs DALI (CPU, and GPU).

Every pipeline renders sslctl's BYOL view pair (byol_views(224): decode, random resized crop,
flip, colour jitter, grayscale, blur, solarisation, normalisation) from the same ~500×375
JPEGs (benchmarks/make_jpegs.py), in batches, as the training loop receives them:
- torchvision: sslctl.data.tv.PretrainLoader (a DataLoader with N worker processes);
- DALI CPU:    sslctl.data.dali.DaliPretrainLoader, N DALI threads, decoding on the CPU;
- DALI mixed:  the same with nvJPEG decoding and augmentation on the GPU (only with CUDA).

Reported per configuration, in steady state (after the first batch, which pays for worker
start-up and DALI's graph build): images/s (wall clock), images per CPU-second (all
processes and threads of the pipeline: the main process, DataLoader workers, DALI threads —
the "per core" rate, and robust on a machine shared with other jobs), and the CPU cores the
pipeline kept busy.

    python benchmarks/bench_data.py [--images DIR] [--n 192] [--batch 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_jpegs beside this file

from make_jpegs import make_jpegs  # noqa: E402

from sslctl.data.index import build_index, index_path  # noqa: E402
from sslctl.data.readers import scan_imagefolder  # noqa: E402
from sslctl.data.views import byol_views  # noqa: E402

# Named from the machine it runs on (it once said "2-core sandbox" on a 16-core GPU machine).
MACHINE = f"{os.cpu_count()}-core {platform.machine()} CPU"


def _tree_cpu() -> float:
    """CPU seconds of this process (all threads) and of its live child processes (DataLoader
    workers), read from /proc so that workers count while they run."""
    total = time.process_time()
    me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid; utime and stime follow at 11 and 12
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _measure(make: Callable[[], object], batches: Callable[[object], Iterator]) -> dict:
    """Steady state: the first batch (worker start-up, DALI graph build, prefetch) is not
    timed; then wall and CPU time over the rest of the epoch."""
    gc.collect()
    loader = make()
    it = batches(loader)
    v1, _ = next(it)
    cpu0, t0, n = _tree_cpu(), time.perf_counter(), 0
    for v1, _ in it:
        n += v1.shape[0]
    if v1.is_cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, _tree_cpu() - cpu0
    del it, loader, v1
    gc.collect()
    return {
        "images": n,
        "img_s_wall": n / max(wall, 1e-9),
        "img_per_cpu_s": n / max(cpu, 1e-9),
        "cpu_cores_busy": cpu / max(wall, 1e-9),
    }


def bench_torchvision(samples: list, batch: int, workers: int) -> dict:
    from sslctl.data.tv import PretrainLoader

    specs = byol_views(224)

    def make() -> PretrainLoader:
        return PretrainLoader(samples, specs, batch, workers=workers)

    return _measure(make, lambda loader: loader.epoch(0))  # type: ignore[attr-defined]


def bench_dali(samples: list, index: object, batch: int, threads: int, gpu: bool) -> dict:
    from sslctl.data.dali import DaliPretrainLoader
    from sslctl.data.dali_runner import DaliOptions

    specs = byol_views(224)
    opts = DaliOptions(threads=threads, gpu=gpu, half=gpu, read_threads=2)

    def make() -> DaliPretrainLoader:
        return DaliPretrainLoader(samples, specs, batch, index, options=opts)  # type: ignore[arg-type]

    return _measure(make, lambda loader: loader.epoch(0))  # type: ignore[attr-defined]


def _table(rows: list[dict]) -> str:
    head = f"{'pipeline':<22}{'N':>4}{'img/s':>9}{'img/CPU-s':>11}{'cores busy':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['pipeline']:<22}{r['n']:>4}{r['img_s_wall']:>9.1f}"
            f"{r['img_per_cpu_s']:>11.1f}{r['cpu_cores_busy']:>12.2f}"
        )
    return "\n".join(lines)


def run(images: Path, batch: int, counts: list[int]) -> list[dict]:
    samples, _ = scan_imagefolder(images)
    rows = []
    for n in counts:
        rows.append(
            {"pipeline": "torchvision DataLoader", "n": n, **bench_torchvision(samples, batch, n)}
        )
    try:
        from sslctl.data.dali_graph import dali_available
    except ImportError:
        return rows
    if not dali_available():
        return rows
    index = build_index([p for p, _ in samples], images, index_path(images)).index
    for n in counts:
        rows.append({"pipeline": "DALI cpu", "n": n, **bench_dali(samples, index, batch, n, False)})
    if torch.cuda.is_available():
        for n in (2, 4):
            rows.append(
                {
                    "pipeline": "DALI mixed (GPU)",
                    "n": n,
                    **bench_dali(samples, index, batch, n, True),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, help="folder of JPEGs (default: generate --n)")
    ap.add_argument("--n", type=int, default=192, help="images to generate")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="workers / threads")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SSLCTL_CACHE", str(Path(tmp) / "cache"))
        images = args.images
        if images is None:
            images = Path(tmp) / "jpegs"
            make_jpegs(images / "all", args.n)
        rows = run(images, args.batch, args.workers)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"machine: {MACHINE}; GPU: {gpu}; {platform.processor() or platform.machine()}")
    print(
        f"two views of 224 px per image, batch {args.batch}; N = DataLoader workers / DALI threads"
    )
    print(_table(rows))
    if args.json:
        meta = {"machine": MACHINE, "gpu": gpu, "batch": args.batch, "torch": torch.__version__}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
