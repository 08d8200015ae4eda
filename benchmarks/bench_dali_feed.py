"""DALI pre-training loader with its feed on the training thread vs on a background thread.

A training step is stood in for by a sleep per batch (``--step-ms``; a GPU step also leaves the
Python thread free): with ``feed_ahead: 0`` the loader's work (DALI's run, whose Python
callback reads files and draws parameters) and the step add up; with ``feed_ahead: 2`` they
overlap. DALI CPU pipelines (this runs without a GPU), byol_views(224), ~500×375 JPEGs.

    python benchmarks/bench_dali_feed.py --n 192 --batch 32 --step-ms 250
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_jpegs beside this file

from make_jpegs import make_jpegs  # noqa: E402

from sslctl.data.dali import DaliPretrainLoader  # noqa: E402
from sslctl.data.dali_runner import DaliOptions  # noqa: E402
from sslctl.data.index import build_index, index_path  # noqa: E402
from sslctl.data.readers import scan_imagefolder  # noqa: E402
from sslctl.data.views import byol_views  # noqa: E402


def run(samples: list, index: object, batch: int, opts: DaliOptions, step_s: float) -> float:
    dl = DaliPretrainLoader(samples, byol_views(224), batch, index, options=opts)  # type: ignore[arg-type]
    it = dl.epoch(0)
    next(it)  # pipeline build and first batch: not counted
    t0, n = time.perf_counter(), 0
    for v1, _ in it:
        time.sleep(step_s)  # the training step
        n += v1.shape[0]
    dl.close()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-ms", type=float, default=250.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "img"
        make_jpegs(root / "c0", a.n)
        samples, _ = scan_imagefolder(root)
        index = build_index([p for p, _ in samples], root, index_path(root)).index
        base = DaliOptions(threads=a.threads, read_threads=2)
        rows = []
        print(f"machine: {os.cpu_count()}-core {platform.machine()} CPU; batch {a.batch}, "
              f"step {a.step_ms:.0f} ms, DALI CPU threads {a.threads}")  # fmt: skip
        for ahead in (0, 2, 0, 2):
            rate = run(samples, index, a.batch, replace(base, feed_ahead=ahead), a.step_ms / 1e3)
            rows.append({"feed_ahead": ahead, "img_per_s": rate})
            print(f"feed_ahead {ahead}: {rate:7.1f} img/s", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
