"""Train-step throughput of the real engine (Trainer.micro_step + optimizer_step) on synthetic data.

    python benchmarks/bench_train_step.py --profile r50-3090x8 --precision fp16 bf16 --batch 196
    python benchmarks/bench_train_step.py --profile r50-3090x8 --batch 12 --steps 2 --warmup 1
    python benchmarks/bench_train_step.py --precision bf16 --channels-last on off --compile off on

Images/s counts source images (each gives two views, both through online and target; with the
profile's multi-resolution draws, as in training). Per row: median step time, img/s, peak memory
(torch.cuda.max_memory_allocated, reset per row, on GPU; ru_maxrss of the process on CPU), the
share of the step spent in the loss (forward + backward of both directions, timed alone on
tensors of the step's shapes) plus LARS + target update (optimizer_step, timed in the loop),
and the model FLOP utilisation: img/s × --gflop-per-image against --peak-tflops.

37 GFLOP per image: ResNet-50 is 8.2 GFLOP (2 × 4.1 GMAC) per 224² forward; SPEC §1's mix runs
two online views at s ∈ U[96, 224] forward + backward (3× a forward) and two target views at
s ∈ U[128, 224] forward only, scaled by E[s²]/224²: 2·3·8.2·0.538 + 2·8.2·0.633 ≈ 36.8.
--peak-tflops defaults to 989: the H100/H200 SXM datasheet's dense bf16/fp16 rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from sslctl import config, dist
from sslctl.engine.amp import AMP_DTYPES
from sslctl.engine.fit import FitRequest, Trainer
from sslctl.losses.triplet import truncated_triplet_loss


class SyntheticLoader:
    """Random batches already on the device: measures the model step, not data loading.

    ``steps_per_epoch`` is the number of steps the benchmark runs, so the Trainer's schedules
    are sized to the run (not to a million-step epoch times the profile's epochs)."""

    def __init__(self, batch: int, size: int, device: torch.device, steps: int):
        self.batch, self.size, self.device = batch, size, device
        self.steps_per_epoch = steps

    def epoch(
        self, epoch: int, start_batch: int = 0, end_batch: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator(device=self.device).manual_seed(epoch)
        x = torch.randn(2, self.batch, 3, self.size, self.size, device=self.device, generator=g)
        while True:
            yield x[0], x[1]


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def loss_seconds(t: Trainer, batch: int, reps: int, cuda: bool) -> float:
    """Median time of the step's loss alone: both directions, forward + backward, same shapes."""
    c, dev = t.cfg, t.di.device
    d = c.model.proj_dim
    times = []
    for _ in range(reps + 2):
        p1, p2 = (torch.randn(batch, d, device=dev, requires_grad=True) for _ in range(2))
        z1, z2 = torch.randn(batch, d, device=dev), torch.randn(batch, d, device=dev)
        _sync(cuda)
        t0 = time.perf_counter()
        kw = dict(
            gamma=c.loss.gamma, margin=c.loss.margin, drop=c.loss.drop_nearest, keep=c.loss.keep
        )
        dtype = AMP_DTYPES[c.train.precision]
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = (
                truncated_triplet_loss(p1, z2, **kw).loss
                + truncated_triplet_loss(p2, z1, **kw).loss
            )
        loss.backward()
        _sync(cuda)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def _compile(t: Trainer) -> None:
    """torch.compile the online network and the target encoder (dynamic: multi-res sizes vary)."""
    t.online = torch.compile(t.online, dynamic=True)  # type: ignore[assignment]
    t.method.target = torch.compile(t.method.target, dynamic=True)  # type: ignore[assignment]


def measure(
    profile: str,
    precision: str,
    batch: int,
    steps: int,
    warmup: int,
    channels_last: bool = True,
    compiled: bool = False,
    cudnn_benchmark: bool = False,
) -> dict[str, float | str | bool]:
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sets = [
        f"train.precision={precision}",
        f"train.batch_size={batch}",
        f"train.channels_last={str(channels_last).lower()}",
        # autotuning per input shape (the Trainer sets it): multi-resolution draws give a new
        # shape most steps
        f"train.cudnn_benchmark={str(cudnn_benchmark).lower()}",
        "train.accumulate=1",
        "train.epochs=1",
        "optim.warmup_epochs=0",
        "train.log_every=1000000",
    ]
    cfg = config.load(profile, sets)
    di = dist.DistInfo(0, 1, 0, dev)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as d:
        loader = SyntheticLoader(batch, cfg.data.image_size, dev, warmup + steps)
        t = Trainer(FitRequest(cfg, Path(d), loader, "none"), di)
        if compiled:
            _compile(t)
        t.method.train()
        it = loader.epoch(0)
        times, opt_times = [], []
        t_start, first_step_s = time.perf_counter(), 0.0
        for i in range(warmup + steps):
            _sync(cuda)
            t0 = time.perf_counter()
            v1, v2 = next(it)
            t.micro_step(v1, v2, last=True)
            _sync(cuda)
            t1 = time.perf_counter()
            t.optimizer_step(finite=True)
            _sync(cuda)
            t2 = time.perf_counter()
            if i == 0:
                first_step_s = t2 - t_start  # includes compiling, with --compile on
            if i >= warmup:
                times.append(t2 - t0)
                opt_times.append(t2 - t1)
        step_s = statistics.median(times)
        opt_s = statistics.median(opt_times)
        peak = (
            torch.cuda.max_memory_allocated() / 2**30
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )
        loss_s = loss_seconds(t, batch, max(steps, 3), cuda)
        del t
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "profile": profile,
        "arch": cfg.model.arch,
        "multires": cfg.method.multires,
        "precision": precision,
        "batch": batch,
        "size": cfg.data.image_size,
        "channels_last": bool(cuda and channels_last),
        "compile": compiled,
        "cudnn_benchmark": cudnn_benchmark,
        "first_step_s": first_step_s,
        "median_step_s": step_s,
        "img_per_s": batch / step_s,
        "peak_mem_gib": peak,
        "opt_s": opt_s,
        "loss_s": loss_s,
        "loss_opt_share": (loss_s + opt_s) / step_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--profile", default="r50-3090x8")
    ap.add_argument("--precision", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--channels-last", nargs="+", choices=["on", "off"], default=["on"])
    ap.add_argument("--compile", nargs="+", choices=["on", "off"], default=["off"])
    ap.add_argument("--cudnn-benchmark", choices=["on", "off"], default="off")
    ap.add_argument("--batch", type=int, default=196)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gflop-per-image", type=float, default=37.0)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not torch.cuda.is_available() and a.precision != ["fp32"]:
        # CPU autocast in fp16/bf16 runs convolutions far slower than fp32: not a useful number.
        print(f"no CUDA device: measuring fp32 on the CPU instead of {' '.join(a.precision)}")
        a.precision = ["fp32"]
    print(
        f"{'device':24} {'prec':5} {'c_last':6} {'compile':7} {'batch':>5} {'img/s':>8} "
        f"{'step s':>7} {'1st s':>6} {'peak GiB':>8} {'loss+opt':>8} {'MFU':>6}",
        flush=True,
    )
    rows = []
    for comp in a.compile:
        for cl in a.channels_last:
            for p in a.precision:
                r = measure(
                    a.profile, p, a.batch, a.steps, a.warmup, cl == "on", comp == "on",
                    a.cudnn_benchmark == "on",
                )  # fmt: skip
                r["mfu"] = float(r["img_per_s"]) * a.gflop_per_image / (a.peak_tflops * 1e3)
                rows.append(r)
                print(
                    f"{r['device']!s:24.24} {p:5} {cl:6} {comp:7} {r['batch']:>5} "
                    f"{r['img_per_s']:>8.1f} {r['median_step_s']:>7.3f} {r['first_step_s']:>6.1f} "
                    f"{r['peak_mem_gib']:>8.2f} {r['loss_opt_share']:>8.1%} {r['mfu']:>6.1%}",
                    flush=True,
                )
                if a.json:  # after every row: a time-out still leaves the rows measured
                    a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
