"""Train-step throughput of the real engine (Trainer.micro_step + optimizer_step) on synthetic data.

    python benchmarks/bench_train_step.py --profile r50-3090x8 --precision fp16 --batch 196
    python benchmarks/bench_train_step.py --profile demo-cpu --steps 10

Images/s counts source images (each gives two views, both through online and target).
Peak memory: torch.cuda.max_memory_allocated on GPU, ru_maxrss of this process on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from sslctl import config, dist
from sslctl.engine.fit import FitRequest, Trainer


class SyntheticLoader:
    """Random batches already on the device: measures the model step, not data loading."""

    def __init__(self, batch: int, size: int, device: torch.device):
        self.batch, self.size, self.device = batch, size, device
        self.steps_per_epoch = 1_000_000

    def epoch(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator(device=self.device).manual_seed(epoch)
        x = torch.randn(2, self.batch, 3, self.size, self.size, device=self.device, generator=g)
        while True:
            yield x[0], x[1]


def measure(
    profile: str, precision: str, batch: int, steps: int, warmup: int
) -> dict[str, float | str]:
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sets = [
        f"train.precision={precision}",
        f"train.batch_size={batch}",
        "train.accumulate=1",
        "train.log_every=1000000",
    ]
    cfg = config.load(profile, sets)
    di = dist.DistInfo(0, 1, 0, dev)
    with tempfile.TemporaryDirectory() as d:
        loader = SyntheticLoader(batch, cfg.data.image_size, dev)
        t = Trainer(FitRequest(cfg, Path(d), loader, "none"), di)
        t.method.train()
        it = loader.epoch(0)
        times = []
        for i in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            v1, v2 = next(it)
            t.micro_step(v1, v2, last=True)
            t.optimizer_step(finite=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "profile": profile,
        "arch": cfg.model.arch,
        "precision": precision,
        "batch": batch,
        "size": cfg.data.image_size,
        "median_step_s": step_s,
        "img_per_s": batch / step_s,
        "peak_mem_gib": peak,
        "channels_last": bool(cuda and cfg.train.channels_last),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--profile", default="r50-3090x8")
    ap.add_argument("--precision", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--batch", type=int, default=196)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = [measure(a.profile, p, a.batch, a.steps, a.warmup) for p in a.precision]
    print(
        f"{'device':32} {'profile':16} {'prec':5} {'batch':>5} {'img/s':>8} {'step s':>7} {'peak GiB':>8}"
    )
    for r in rows:
        print(
            f"{r['device']!s:32} {r['profile']!s:16} {r['precision']!s:5} {r['batch']:>5} "
            f"{r['img_per_s']:>8.1f} {r['median_step_s']:>7.3f} {r['peak_mem_gib']:>8.2f}"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
