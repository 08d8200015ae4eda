"""Re-ID ranking time and peak memory on random L2-normalised features (REID.md §8).

Each case runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its
own. The gallery is generated in chunks (no second full-size temporary) with SYSU-30k's label
structure: query i's only positive is gallery image i, everything else is a distractor (id 0),
queries are camera 2 and the gallery camera 1. ``--positives K`` gives every query K positives
instead (Market-style, exercises the searchsorted path).

    python benchmarks/bench_reid_rank.py                       # 1000×100k and 1000×478,730
    python benchmarks/bench_reid_rank.py --gallery 100000 --budget-mib 256 --naive
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

_CHUNK = 1 << 12  # rows per generation step (32 MiB at 2048-d)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) so that it measures ranking, not generation."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make(n_q: int, n_g: int, dim: int, positives: int, seed: int = 0):
    """(query, gallery) LabeledFeatures; queries are noisy copies of one of their positives."""
    import torch
    import torch.nn.functional as F

    from sslctl.eval.reid.metrics import LabeledFeatures

    g = torch.Generator().manual_seed(seed)
    gf = torch.empty(n_g, dim)
    for i in range(0, n_g, _CHUNK):
        gf[i : i + _CHUNK] = F.normalize(torch.randn(min(_CHUNK, n_g - i), dim, generator=g), dim=1)
    gid = torch.zeros(n_g, dtype=torch.int64)
    gid[: n_q * positives] = torch.arange(n_q * positives) // positives + 1
    qf = F.normalize(
        gf[: n_q * positives : positives] + 8.0 * torch.randn(n_q, dim, generator=g) / dim**0.5,
        dim=1,
    )
    query = LabeledFeatures(qf, torch.arange(1, n_q + 1), torch.full((n_q,), 2))
    gallery = LabeledFeatures(gf, gid, torch.ones(n_g, dtype=torch.int64))
    return query, gallery


def _naive(query, gallery) -> float:
    """torchreid-style reference cost: full n_q×n_g score matrix + full argsort of each row."""
    import torch

    s = query.features @ gallery.features.T
    order = torch.argsort(s, dim=1, descending=True)
    matches = gallery.ids[order] == query.ids[:, None]
    return float(matches[:, 0].float().mean())


def child(n_q: int, n_g: int, dim: int, budget: int, positives: int, naive: bool) -> None:
    import torch

    from sslctl.eval.reid import metrics as rm

    query, gallery = _make(n_q, n_g, dim, positives)
    # Warm-up on a slice: loads the GEMM/sort kernels' code pages before the peak is reset.
    rm.positive_ranks(
        rm.LabeledFeatures(query.features[:8], query.ids[:8], query.cams[:8]),
        rm.LabeledFeatures(gallery.features[:4096], gallery.ids[:4096], gallery.cams[:4096]),
        block=4,
    )
    rss_features = _rss_bytes()
    peak_was_reset = _reset_peak()
    block = rm.block_size(n_q, n_g, budget)
    t0 = time.perf_counter()
    if naive:
        rank1 = _naive(query, gallery)
    else:
        ranks = rm.positive_ranks(query, gallery, block=block)
        rank1 = rm.summarize(ranks).rank1
    seconds = time.perf_counter() - t0
    peak = _peak_bytes()  # since the reset: the ranking's own high-water mark
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # whole process, KiB
    print(json.dumps({
        "n_q": n_q, "n_g": n_g, "dim": dim, "positives": positives,
        "method": "naive full argsort" if naive else "sslctl blocks", "budget_bytes": budget,
        "block": block, "seconds": seconds, "rank1": rank1, "threads": torch.get_num_threads(),
        "rss_after_features_bytes": rss_features, "peak_rss_bytes": peak,
        "peak_was_reset": peak_was_reset, "ru_maxrss_bytes": maxrss,
        "bound_bytes": rm.memory_bound(n_q, n_g, dim, block),
    }))  # fmt: skip


def _row(r: dict) -> str:
    gib = 2**30
    return (
        f"| {r['n_q']:,} × {r['n_g']:,} | {r['positives']} | {r['method']} | "
        f"{r['budget_bytes'] / 2**20:.0f} MiB / {r['block']} | {r['seconds']:.1f} | "
        f"{r['rss_after_features_bytes'] / gib:.2f} | {r['peak_rss_bytes'] / gib:.2f} | "
        f"{(r['peak_rss_bytes'] - r['rss_after_features_bytes']) / gib:.2f} | "
        f"{r['bound_bytes'] / gib:.2f} | {r['ru_maxrss_bytes'] / gib:.2f} | {100 * r['rank1']:.1f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--gallery", type=int, nargs="+", default=[100_000, 478_730])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--budget-mib", type=int, default=1024)
    p.add_argument("--positives", type=int, default=1)
    p.add_argument("--naive", action="store_true", help="also time the full-argsort reference")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    budget = a.budget_mib * 2**20
    if a.child:
        child(a.queries, a.gallery[0], a.dim, budget, a.positives, a.naive)
        return
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print("| n_q × n_g | pos/query | method | budget / block | s | RSS before ranking GiB | "
          "peak RSS ranking GiB | peak − before GiB | bound GiB | ru_maxrss GiB | rank-1 % |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n_g in a.gallery:
        for naive in (False, True) if a.naive else (False,):
            cmd = [sys.executable, __file__, "--child", "--queries", str(a.queries), "--gallery",
                   str(n_g), "--dim", str(a.dim), "--budget-mib", str(a.budget_mib),
                   "--positives", str(a.positives)] + (["--naive"] if naive else [])  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            print(_row(json.loads(out.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
