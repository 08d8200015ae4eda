"""``sslctl linear-eval``: the SPEC §3 linear evaluation (or the cached-feature proxy)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sslctl.cli.common import EXIT_PREEMPTED, TRUST_PICKLE_HELP, out_console, user_errors

# torch (through sslctl.api) is imported inside the command: `sslctl --help` stays fast.

HELP = (
    "Linear evaluation of a frozen backbone (the paper's protocol): --protocol standard trains Linear(feat, "
    "classes) on RandomResizedCrop+flip views with SGD, warm-up + cosine, top-1/top-5 every "
    "epoch (DDP with --nproc-per-node, AMP, resumes from OUT/checkpoints). --protocol cached is "
    "a fast proxy: centre-crop features extracted once and cached (OUT/cache or --cache-dir), "
    "then a head on the standardised features, plus weighted kNN. --data ROOT needs ROOT/train "
    "and ROOT/val; --data bundled is the demo set. Weights that carry their pre-training config "
    "(sslctl runs) are evaluated at its image size unless a --profile other than the default or "
    "--set data.image_size / data.resize is given. A rerun continues OUT (with a larger linear.epochs: further). Writes "
    "OUT/results.json."
)

Opt = typer.Option
OPTION_HELP = {
    "weights": "checkpoint (file, run dir, …/last), extracted backbone or torchvision .pth",
    "data": "root with train/ and val/ (ImageFolder), or 'bundled' (the demo digits)",
    "split": "folder or list file of 'relative/path label' lines (relative to --data)",
    "profile": "linear-eval profile (see `sslctl profiles`) or YAML file "
    "(default: linear-demo-cpu for --data bundled, else linear-r50)",
    "random": "also evaluate a seeded random initialisation of the same architecture",
    "fresh": "start over: a run already in --out (checkpoints, metrics, results) moves to "
    "OUT/superseded/<time>/ first",
    "nproc": "launch N processes with torchrun (DDP); 0 = this process only",
    "device": "auto | cpu | cuda | cuda:N (checked before any work)",
    "trust_pickle": TRUST_PICKLE_HELP,
}


# Options linear-eval and knn-eval share, declared once.
Weights = Annotated[Path, typer.Argument(metavar="WEIGHTS", help=OPTION_HELP["weights"])]
Data = Annotated[str | None, Opt(metavar="DIR|bundled", help=OPTION_HELP["data"])]
Profile = Annotated[str | None, Opt(metavar="NAME|FILE", help=OPTION_HELP["profile"])]
CompareRandom = Annotated[bool, Opt("--compare-random", help=OPTION_HELP["random"])]
Part = Annotated[
    str, Opt(metavar="online|target", help="online | target backbone of an sslctl checkpoint")
]
CacheDir = Annotated[Path | None, Opt(metavar="DIR", help="cached features (default: OUT/cache)")]
Recompute = Annotated[bool, Opt("--recompute", help="ignore cached features")]
Device = Annotated[str, Opt(metavar="auto|cpu|cuda|cuda:N", help=OPTION_HELP["device"])]
Nproc = Annotated[int, Opt(metavar="N", help=OPTION_HELP["nproc"])]
TrustPickle = Annotated[bool, Opt("--trust-pickle", help=OPTION_HELP["trust_pickle"])]


def _row(t: Table, name: str, r: dict[str, Any], cached: bool) -> None:
    cells = [f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"{r['best_top1']:.2f}"]
    if cached:
        cells.append(f"{r['knn_top1']:.2f}")
    t.add_row(name, *cells, "yes" if r["backbone_unchanged"] else "NO")


def results_table(r: dict[str, Any]) -> Table:
    cached = r["protocol"] == "cached"
    what = "cached-feature proxy" if cached else "standard protocol, the paper's"
    t = Table(title=f"linear evaluation ({what}, {r['epochs']} epochs, {r['arch']})")
    t.add_column("backbone", style="bold")
    for col in ("top-1 %", "top-5 %", "best top-1 %", *(["kNN top-1 %"] if cached else [])):
        t.add_column(col, justify="right")
    t.add_column("backbone unchanged")
    _row(t, "learned", r, cached)
    if "random_init" in r:
        _row(t, "random init", r["random_init"], cached)
    return t


@user_errors
def command(
    weights: Weights,
    data: Data = None,
    train: Annotated[
        Path | None, Opt(metavar="PATH", help=f"training split: {OPTION_HELP['split']}")
    ] = None,
    val: Annotated[
        Path | None, Opt(metavar="PATH", help=f"validation split: {OPTION_HELP['split']}")
    ] = None,
    profile: Profile = None,
    out: Annotated[
        Path, Opt(metavar="DIR", help="run directory (results.json, metrics.jsonl, …)")
    ] = Path("runs/linear"),
    protocol: Annotated[
        str,
        Opt(
            metavar="standard|cached", help="standard (the paper's protocol) | cached (fast proxy)"
        ),
    ] = "standard",
    set_: Annotated[
        list[str] | None,
        Opt("--set", metavar="KEY=VALUE", help="override a profile key: --set linear.lr=0.15"),
    ] = None,
    compare_random: CompareRandom = False,
    part: Part = "online",
    fresh: Annotated[bool, Opt("--fresh", help=OPTION_HELP["fresh"])] = False,
    cache_dir: CacheDir = None,
    recompute: Recompute = False,
    device: Device = "auto",
    nproc_per_node: Nproc = 0,
    trust_pickle: TrustPickle = False,
    tensorboard: Annotated[
        bool,
        Opt(
            "--tensorboard",
            help="also write the metrics as TensorBoard events under OUT/tb/ (needs pip install "
            "'sslctl[tensorboard]')",
        ),
    ] = False,
) -> None:
    if nproc_per_node > 0:
        from sslctl.cli.launch import relaunch_with_torchrun
        from sslctl.dist import check_device

        check_device(device)  # one line here, not one per process under torchrun

        raise typer.Exit(relaunch_with_torchrun(nproc_per_node, sys.argv[1:]))
    from sslctl import api

    res = api.linear_eval(
        weights, data=data, train=train, val=val, profile=profile, out=out,
        protocol=protocol, sets=tuple(set_ or ()), compare_random=compare_random, part=part,
        fresh=fresh, cache_dir=cache_dir, recompute=recompute, device=device,
        trust_pickle=trust_pickle, tensorboard=tensorboard,
    )  # fmt: skip
    if res.stopped == "signal":
        if int(os.environ.get("RANK", "0")) == 0:
            out_console.print("linear-eval stopped by a signal (checkpointed); rerun to continue")
        raise typer.Exit(EXIT_PREEMPTED)
    if not res.results:  # ranks other than 0 under torchrun
        return
    out_console.print(results_table(res.results))
    if res.results["protocol"] == "cached":
        out_console.print(f"note: {res.results['note']}", markup=False)
    out_console.print(f"results: {res.results_path}", markup=False, soft_wrap=True)
