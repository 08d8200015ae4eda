"""End-to-end `sslctl pretrain` on synthetic JPEGs, per data backend: runs, resumes, img/s.

For each backend: `python -m sslctl pretrain --profile PROFILE --max-steps S` (a fresh run
directory; micro-batch --batch, accumulate 1), then the same command with --max-steps S + R
(it must resume from the checkpoint of step S, not start over). Reports: whether both runs
exited 0, the last loss (finite?), the step the checkpoint holds, the resumed run's start step,
and the img/s of the second epoch (the metrics' img_s at its last step: that epoch's whole wall
time, data loading included: the "end to end" rate).

    python benchmarks/bench_pretrain_e2e.py --images DIR --backend dali torchvision
    python benchmarks/bench_pretrain_e2e.py --make 2000  # writes ~500×375 JPEGs first
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_jpegs beside this file

from make_jpegs import make_jpegs  # noqa: E402


def make_tree(root: Path, n: int, classes: int = 8) -> Path:
    """``n`` JPEGs in ``classes`` class folders (ImageFolder), written in parallel."""
    per = [n // classes + (1 if c < n % classes else 0) for c in range(classes)]
    with ProcessPoolExecutor(min(classes, os.cpu_count() or 1)) as ex:
        list(ex.map(make_jpegs, [root / f"c{c}" for c in range(classes)], per, [500] * classes,
                    [375] * classes, range(classes)))  # fmt: skip
    return root


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one_backend(a: argparse.Namespace, backend: str, images: Path, runs: Path) -> dict:
    run = runs / backend
    base = [sys.executable, "-m", "sslctl", "pretrain", "--profile", a.profile, "--data", str(images),
            "--out", str(run), "--set", f"data.backend={backend}", "--set", "train.accumulate=1",
            "--set", f"train.batch_size={a.batch}", "--set", f"train.precision={a.precision}",
            "--set", f"data.workers={a.workers}", "--set", "train.log_every=1"]  # fmt: skip
    row: dict = {
        "backend": backend,
        "profile": a.profile,
        "batch": a.batch,
        "precision": a.precision,
    }
    t0 = time.perf_counter()
    first = subprocess.run([*base, "--max-steps", str(a.steps)], capture_output=True, text=True)
    row["first_s"] = time.perf_counter() - t0
    row["first_rc"] = first.returncode
    recs = _records(run)
    status = run / "status.json"
    row["ckpt_step"] = json.loads(status.read_text())["step"] if status.is_file() else None
    losses = [r["loss"] for r in recs if "loss" in r]
    row["last_loss"] = losses[-1] if losses else float("nan")
    row["loss_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    # img_s is the rate since the epoch began: the last record of the second epoch is the whole
    # epoch's rate, data loading and the epoch's start-up included (the first epoch also pays
    # for cuDNN's first calls and the loader's start).
    rates = [r["img_s"] for r in recs if "img_s" in r and 1.0 < r.get("epoch", 0) <= 2.0]
    rates = rates or [r["img_s"] for r in recs if "img_s" in r]
    row["img_per_s"] = rates[-1] if rates else float("nan")
    t0 = time.perf_counter()
    again = subprocess.run(
        [*base, "--max-steps", str(a.steps + a.resume_steps)], capture_output=True, text=True
    )
    row["resume_s"] = time.perf_counter() - t0
    row["resume_rc"] = again.returncode
    later = _records(run)
    steps = [r["step"] for r in later if "loss" in r]
    row["resumed_from"] = min((s for s in steps if s > a.steps), default=None)
    row["resume_last_step"] = max(steps, default=None)
    row["ok"] = (
        first.returncode == 0
        and again.returncode == 0
        and row["loss_finite"]
        and row["ckpt_step"] == a.steps
        and row["resumed_from"] == a.steps + 1
        and row["resume_last_step"] == a.steps + a.resume_steps
    )
    if not row["ok"]:
        row["stderr_tail"] = (first.stderr[-1500:], again.stderr[-1500:])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=Path, help="ImageFolder root (default: make --make JPEGs)")
    ap.add_argument("--make", type=int, default=2000)
    ap.add_argument("--profile", default="r50-3090x8")
    ap.add_argument("--backend", nargs="+", default=["dali", "torchvision"])
    ap.add_argument("--batch", type=int, default=196)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resume-steps", type=int, default=4)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        images = a.images
        if images is None:
            t0 = time.perf_counter()
            images = make_tree(Path(d) / "images", a.make)
            print(f"wrote {a.make} JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        print(f"{'backend':12} {'ok':3} {'img/s':>8} {'loss':>8} {'ckpt':>5} {'resumed':>7} "
              f"{'1st run s':>9} {'resume s':>8}", flush=True)  # fmt: skip
        for backend in a.backend:
            r = one_backend(a, backend, images, Path(d) / "runs")
            rows.append(r)
            print(f"{backend:12} {'yes' if r['ok'] else 'NO':3} {r['img_per_s']:>8.1f} "
                  f"{r['last_loss']:>8.4f} {r['ckpt_step']!s:>5} {r['resumed_from']!s:>7} "
                  f"{r['first_s']:>9.1f} {r['resume_s']:>8.1f}", flush=True)  # fmt: skip
            if not r["ok"]:
                for tail in r["stderr_tail"]:
                    print(tail, flush=True)
            if a.json:
                a.json.write_text(json.dumps(rows, indent=1))
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
