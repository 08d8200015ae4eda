"""``sslctl knn-eval``: weighted k-nearest-neighbour classification of frozen features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sslctl.cli import common
from sslctl.cli.common import out_console, set_option, split_option, user_errors
from sslctl.cli.launch import relaunch_if_asked

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
    weights: common.Weights,
    data: common.Data = None,
    train: Annotated[Path | None, split_option("memory bank split")] = None,
    val: Annotated[Path | None, split_option("query split")] = None,
    k: Annotated[
        int | None, Opt(metavar="N", help="neighbours (default: the profile's knn.k, 20)")
    ] = None,
    temperature: Annotated[
        float | None,
        Opt(metavar="T", help="vote temperature (default: the profile's knn.temperature, 0.07)"),
    ] = None,
    profile: common.Profile = None,
    out: Annotated[Path, Opt(metavar="DIR", help="results.json and cache/")] = Path("runs/knn"),
    set_: Annotated[list[str] | None, set_option("override a profile key (repeatable)")] = None,
    compare_random: common.CompareRandom = False,
    part: common.Part = "online",
    cache_dir: common.CacheDir = None,
    recompute: common.Recompute = False,
    device: common.Device = "auto",
    nproc_per_node: common.Nproc = 0,
    trust_pickle: common.TrustPickle = False,
) -> None:
    relaunch_if_asked(nproc_per_node, device)
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
