"""The methods side by side on the bundled digits: demo-cpu (Triplet) and the demo-cpu-byol,
-simclr, -mocov2 and -simsiam variants at the same network, data, budget and evaluation.

For each profile: `sslctl pretrain --profile P --out OUT/P` (a fresh run directory), then
`sslctl linear-eval OUT/P --data bundled --protocol cached --compare-random --out OUT/P-eval`
(cached linear probe and kNN, learned and random init). Prints one Markdown table: probe and
kNN top-1 (learned / random init), the pre-training wall time and its mean img/s (mean of the
metrics' img_s records), and whether the learned backbone beats the random one on both.

    python benchmarks/bench_demo_methods.py --out /tmp/demo-methods
    python benchmarks/bench_demo_methods.py --profiles demo-cpu demo-cpu-simclr --set train.epochs=4
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROFILES = ["demo-cpu", "demo-cpu-byol", "demo-cpu-simclr", "demo-cpu-mocov2", "demo-cpu-simsiam"]


def sslctl(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "sslctl", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sslctl {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")


def one(profile: str, out: Path, sets: list[str]) -> dict[str, object]:
    run, ev = out / profile, out / f"{profile}-eval"
    for d in (run, ev):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    sslctl("pretrain", "--profile", profile, "--out", str(run), *[f"--set={s}" for s in sets])
    seconds = time.perf_counter() - t0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rates = [r["img_s"] for r in recs if "img_s" in r]
    steps = max(r.get("step", 0) for r in recs)
    sslctl("linear-eval", str(run), "--data", "bundled", "--protocol", "cached",
           "--compare-random", "--out", str(ev))  # fmt: skip
    res = json.loads((ev / "results.json").read_text())
    rnd = res["random_init"]
    return {
        "profile": profile,
        "steps": steps,
        "probe": res["top1"],
        "probe_random": rnd["top1"],
        "knn": res["knn_top1"],
        "knn_random": rnd["knn_top1"],
        "pretrain_s": seconds,
        "img_s": sum(rates) / max(len(rates), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-demo-methods"))
    ap.add_argument("--profiles", nargs="+", default=PROFILES)
    ap.add_argument("--set", action="append", default=[], help="passed to every pretrain")
    a = ap.parse_args()
    rows = []
    for p in a.profiles:
        rows.append(one(p, a.out, a.set))
        print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| profile | steps | probe top-1 % (random) | kNN top-1 % (random) | beats random "
        "on both | pre-training | mean img/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        beats = r["probe"] > r["probe_random"] and r["knn"] > r["knn_random"]  # type: ignore[operator]
        print(
            f"| {r['profile']} | {r['steps']} | {r['probe']:.2f} ({r['probe_random']:.2f}) | "
            f"{r['knn']:.2f} ({r['knn_random']:.2f}) | {'yes' if beats else 'NO'} | "
            f"{r['pretrain_s'] / 60:.1f} min | {r['img_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
