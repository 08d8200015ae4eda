"""Truncated triplet loss: vectorised (topk) vs the reference's per-anchor loop.

Times forward + backward of one loss direction, median over repeats, on CPU and (when present)
CUDA. Usage:
    python benchmarks/bench_loss.py [--sizes 104 196] [--repeats 15] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sslctl.losses import truncated_triplet_loss, truncated_triplet_loss_reference


def _time_ms(
    fns: dict[str, Callable[[], None]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median wall time of each function in ms. The functions take turns within every repeat,
    so that load from other processes on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats + 1):  # the first round warms up allocator and code paths
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _fwd_bwd(loss_fn, n: int, m: int, dim: int, device: torch.device) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, dim, generator=gen).to(device).requires_grad_()
    z = torch.randn(m, dim, generator=gen).to(device).requires_grad_()

    def run() -> None:
        loss_fn(p, z).loss.backward()
        p.grad = z.grad = None

    return run


def bench(sizes: list[int], dim: int, repeats: int, devices: list[torch.device]) -> list[dict]:
    rows = []
    for device in devices:
        for n in sizes:
            ms = _time_ms(
                {
                    "loop": _fwd_bwd(truncated_triplet_loss_reference, n, n, dim, device),
                    "vec": _fwd_bwd(truncated_triplet_loss, n, n, dim, device),
                },
                device,
                repeats,
            )
            loop, vec = ms["loop"], ms["vec"]
            rows.append(
                {"device": str(device), "n": n, "d": dim, "loop_ms": round(loop, 3),
                 "vectorised_ms": round(vec, 3), "speedup": round(loop / vec, 1)}
            )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[104, 196])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = bench(args.sizes, args.dim, args.repeats, devices)
    print(f"truncated triplet loss, forward+backward, median of {args.repeats} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")  # fmt: skip
    print(f"{'device':<8}{'n':>6}{'d':>6}{'loop ms':>12}{'vector ms':>12}{'speedup':>10}")
    for r in rows:
        print(f"{r['device']:<8}{r['n']:>6}{r['d']:>6}{r['loop_ms']:>12.2f}"
              f"{r['vectorised_ms']:>12.3f}{r['speedup']:>9.1f}x")  # fmt: skip
    if args.json:
        meta = {"machine": platform.machine(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "repeats": args.repeats}  # fmt: skip
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name()
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
