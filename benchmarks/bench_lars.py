"""LARS step and target EMA update on ResNet-50's parameters: foreach vs per-parameter loops.

- LARS: sslctl's `LARS.step()` (torch._foreach_*, no host syncs) vs the reference's shape, a
  Python loop over parameters that reads both norms back with `.item()` (a sync per parameter
  on a GPU).
- EMA (θ_t ← m·θ_t + (1−m)·θ_o): `_foreach_mul_` + `_foreach_add_`, `_foreach_lerp_`, and a
  per-parameter loop.

Usage: python benchmarks/bench_lars.py [--repeats 10] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

from sslctl.engine.lars import LARS, param_groups_lars


def _time_ms(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int
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


@torch.no_grad()
def loop_lars_step(groups: list[dict[str, Any]], bufs: dict[int, torch.Tensor]) -> None:
    """One LARS step the way the reference wrote it: per parameter, norms read to the host."""
    for group in groups:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            trust = 1.0
            if not group["lars_exclude"]:
                w_norm, g_norm = p.norm().item(), p.grad.norm().item()
                if w_norm > 0 and g_norm > 0:
                    trust = group["trust_coef"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            update = p.grad.add(p, alpha=wd).mul_(lr * trust)
            buf = bufs.get(id(p))
            if buf is None:
                buf = bufs[id(p)] = torch.zeros_like(p)
            buf.mul_(mu).add_(update)
            p.sub_(buf)


def _resnet50_params(device: torch.device) -> torch.nn.Module:
    model = torchvision.models.resnet50().to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
    return model


def bench_device(device: torch.device, repeats: int) -> list[dict[str, Any]]:
    model = _resnet50_params(device)
    groups = param_groups_lars(model, 1e-6)
    opt = LARS(groups, lr=4.8, momentum=0.9, trust_coef=0.001)
    bufs: dict[int, torch.Tensor] = {}
    online = [p.detach() for p in model.parameters()]
    target = [p.clone() for p in online]
    m = 0.99

    def ema_foreach() -> None:
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, online, alpha=1.0 - m)

    def ema_lerp() -> None:
        torch._foreach_lerp_(target, online, 1.0 - m)

    def ema_loop() -> None:
        for t, o in zip(target, online, strict=True):
            t.mul_(m).add_(o, alpha=1.0 - m)

    cases: dict[tuple[str, str], Callable[[], Any]] = {
        ("lars step", "foreach (sslctl)"): opt.step,
        ("lars step", "per-param loop"): lambda: loop_lars_step(opt.param_groups, bufs),
        ("target ema", "foreach mul_+add_"): ema_foreach,
        ("target ema", "foreach lerp_"): ema_lerp,
        ("target ema", "per-param loop"): ema_loop,
    }
    ms = _time_ms({f"{what}|{how}": fn for (what, how), fn in cases.items()}, device, repeats)
    rows = []
    for (what, how), _ in cases.items():
        rows.append({"device": str(device), "op": what, "impl": how,
                     "ms": round(ms[f"{what}|{how}"], 3)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = [r for d in devices for r in bench_device(d, args.repeats)]
    n_tensors = len(list(torchvision.models.resnet50().parameters()))
    n_elems = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    print(f"ResNet-50: {n_tensors} parameter tensors, {n_elems / 1e6:.1f} M values; "
          f"median of {args.repeats} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads)")  # fmt: skip
    print(f"{'device':<8}{'op':<12}{'implementation':<20}{'ms':>10}")
    for r in rows:
        print(f"{r['device']:<8}{r['op']:<12}{r['impl']:<20}{r['ms']:>10.2f}")
    if args.json:
        meta = {"machine": platform.machine(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "repeats": args.repeats,
                "param_tensors": n_tensors, "param_values": n_elems}  # fmt: skip
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name()
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
