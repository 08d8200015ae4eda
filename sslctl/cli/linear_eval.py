"""``sslctl linear-eval``: the SPEC §3 linear evaluation (or the cached-feature proxy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sslctl.cli import common
from sslctl.cli.common import EXIT_PREEMPTED, out_console, set_option, split_option, user_errors
from sslctl.cli.launch import relaunch_if_asked

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
    weights: common.Weights,
    data: common.Data = None,
    train: Annotated[Path | None, split_option("training split")] = None,
    val: Annotated[Path | None, split_option("validation split")] = None,
    profile: common.Profile = None,
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
        list[str] | None, set_option("override a profile key: --set linear.lr=0.15")
    ] = None,
    compare_random: common.CompareRandom = False,
    part: common.Part = "online",
    fresh: Annotated[
        bool,
        Opt(
            "--fresh",
            help="start over: a run already in --out (checkpoints, metrics, results) moves to "
            "OUT/superseded/<time>/ first",
        ),
    ] = False,
    cache_dir: common.CacheDir = None,
    recompute: common.Recompute = False,
    device: common.Device = "auto",
    nproc_per_node: common.Nproc = 0,
    trust_pickle: common.TrustPickle = False,
    tensorboard: Annotated[
        bool,
        Opt(
            "--tensorboard",
            help="also write the metrics as TensorBoard events under OUT/tb/ (needs pip install "
            "'sslctl[tensorboard]')",
        ),
    ] = False,
) -> None:
    relaunch_if_asked(nproc_per_node, device)
    from sslctl import api, dist

    res = api.linear_eval(
        weights, data=data, train=train, val=val, profile=profile, out=out,
        protocol=protocol, sets=tuple(set_ or ()), compare_random=compare_random, part=part,
        fresh=fresh, cache_dir=cache_dir, recompute=recompute, device=device,
        trust_pickle=trust_pickle, tensorboard=tensorboard,
    )  # fmt: skip
    if res.stopped == "signal":
        if dist.is_main():
            out_console.print("linear-eval stopped by a signal (checkpointed); rerun to continue")
        raise typer.Exit(EXIT_PREEMPTED)
    if not res.results:  # ranks other than 0 under torchrun
        return
    out_console.print(results_table(res.results))
    if res.results["protocol"] == "cached":
        out_console.print(f"note: {res.results['note']}", markup=False)
    out_console.print(f"results: {res.results_path}", markup=False, soft_wrap=True)
