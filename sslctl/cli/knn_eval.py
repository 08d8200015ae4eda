"""``sslctl knn-eval``: weighted k-nearest-neighbour classification of frozen features."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sslctl.cli.common import out_console, user_errors
from sslctl.cli.linear_eval import (
    OPTION_HELP,
    CacheDir,
    CompareRandom,
    Data,
    Device,
    Nproc,
    Part,
    Profile,
    Recompute,
    TrustPickle,
    Weights,
)

# torch (through sslctl.api) is imported inside the command: `sslctl --help` stays fast.

HELP = (
    "Weighted kNN evaluation (InstDisc/DINO): each val image's k most cosine-similar training "
    "images vote for their class with weight exp(sim/T); top-1/top-5. Centre-crop features, "
    "extracted once and cached (OUT/cache or --cache-dir; the same cache as linear-eval "
    "--protocol cached). Weights that carry their pre-training config (sslctl runs) are "
    "evaluated at its image size unless a --profile other than the default or --set "
    "data.image_size / data.resize is given. Writes OUT/results.json."
)
Opt = typer.Option


def results_table(r: dict[str, Any]) -> Table:
    t = Table(title=f"weighted kNN (k={r['k']}, T={r['temperature']}, {r['arch']})")
    t.add_column("backbone", style="bold")
    t.add_column("top-1 %", justify="right")
    t.add_column("top-5 %", justify="right")
    t.add_row("learned", f"{r['top1']:.2f}", f"{r['top5']:.2f}")
    if "random_init" in r:
        rnd = r["random_init"]
        t.add_row("random init", f"{rnd['top1']:.2f}", f"{rnd['top5']:.2f}")
    return t


@user_errors
def command(
    weights: Weights,
    data: Data = None,
    train: Annotated[
        Path | None, Opt(metavar="PATH", help=f"memory bank split: {OPTION_HELP['split']}")
    ] = None,
    val: Annotated[
        Path | None, Opt(metavar="PATH", help=f"query split: {OPTION_HELP['split']}")
    ] = None,
    k: Annotated[
        int | None, Opt(metavar="N", help="neighbours (default: the profile's knn.k, 20)")
    ] = None,
    temperature: Annotated[
        float | None,
        Opt(metavar="T", help="vote temperature (default: the profile's knn.temperature, 0.07)"),
    ] = None,
    profile: Profile = None,
    out: Annotated[Path, Opt(metavar="DIR", help="results.json and cache/")] = Path("runs/knn"),
    set_: Annotated[
        list[str] | None,
        Opt("--set", metavar="KEY=VALUE", help="override a profile key (repeatable)"),
    ] = None,
    compare_random: CompareRandom = False,
    part: Part = "online",
    cache_dir: CacheDir = None,
    recompute: Recompute = False,
    device: Device = "auto",
    nproc_per_node: Nproc = 0,
    trust_pickle: TrustPickle = False,
) -> None:
    if nproc_per_node > 0:
        from sslctl.cli.launch import relaunch_with_torchrun
        from sslctl.dist import check_device

        check_device(device)  # one line here, not one per process under torchrun

        raise typer.Exit(relaunch_with_torchrun(nproc_per_node, sys.argv[1:]))
    from sslctl import api

    res = api.knn_eval(
        weights, data=data, train=train, val=val, k=k, temperature=temperature,
        profile=profile, out=out, sets=tuple(set_ or ()), compare_random=compare_random,
        part=part, cache_dir=cache_dir, recompute=recompute, device=device,
        trust_pickle=trust_pickle,
    )  # fmt: skip
    if not res.results:  # ranks other than 0 under torchrun
        return
    out_console.print(results_table(res.results))
    out_console.print(f"results: {res.results_path}", markup=False, soft_wrap=True)
