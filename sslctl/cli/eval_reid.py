"""``sslctl eval-reid``: person re-identification evaluation (CMC rank-k, mAP) at SYSU-30k scale."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

# No torch here: `sslctl --help` imports every command module, so `sslctl.api` (torch) is
# imported inside the command.
from sslctl import UserError
from sslctl.cli.common import WEIGHTS_HELP, Part, TrustPickle, out_console, user_errors
from sslctl.cli.launch import relaunch_if_asked

HELP = (
    "Re-identification evaluation: CMC rank-1/5/10, mAP (and mINP) with the junk rule, on "
    "SYSU-30k, Market-1501-style or ImageFolder query/gallery sets, or on given features files. "
    "Features (256x128 bicubic, GAP of the image and its mirror, fused, L2-normalised) are "
    "cached in OUT/features/ and positive ranks in OUT/ranks.safetensors, so changing --ap, "
    "--denominator, --ties or --max-rank re-uses both. Ranking is exact and runs in query blocks: peak memory "
    "~ 4*d*(n_g+n_q) + b*n_g*11 bytes with b = mem_budget/(11*n_g) queries per block "
    "(SYSU-30k, 1 GiB budget: ~5 GB). Defaults depend on --layout: sysu30k reproduces the "
    "paper's evaluation script (legacy-triplet fusion, fp32 features, trapezoid AP, denominator "
    "all); market1501 and imagefolder use sum, auto precision, standard AP, valid queries. "
    "Explicit flags, then --compat, win. Scores are always fp32 with TF32 off. "
    "Not built: --rerank and the cuhk03-sgs protocol. Writes OUT/results.json (the latest run, "
    "with the weights' sha256, data roots, options and sslctl version) and "
    "OUT/results-HASH.json (HASH: the options), so runs with other options are kept."
)

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_size(text: str) -> int:
    """Bytes from '1GiB', '512MiB', '2G', '1.5GB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGkmg][iI]?)?[bB]?\s*", text)
    if m is None:
        raise UserError(f"--mem-budget {text!r}: expected a size such as 1GiB, 512MiB or 2G")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def _table(r: dict[str, Any]) -> Table:
    layout = escape(str(r["layout"] or "features"))  # from a features file's metadata
    t = Table(title=f"re-ID ({layout}; {r['ap_definition']} AP, {r['ties']} ties)")
    for col in ("rank-1", "rank-5", "rank-10", "mAP", "valid queries", "gallery"):
        t.add_column(col, justify="right")
    t.add_row(
        f"{r['rank1']:.2f}",
        f"{r['rank5']:.2f}",
        f"{r['rank10']:.2f}",
        f"{r['mAP']:.2f}",
        f"{r['num_valid_queries']} / {r['num_queries']}",
        f"{r['num_gallery']}",
    )
    return t


Opt = typer.Option
_H = {
    "data": "test-set root (query/ + gallery/, or bounding_box_test/ for market1501)",
    "out": "results.json, cmc.png, features/ and ranks caches",
    "layout": "sysu30k | market1501 | imagefolder (also picks the defaults of --flip-fusion, "
    "--precision, --ap and --denominator). Default: detected from --data: query/ + "
    "bounding_box_test/ is market1501, query/ + gallery/ with 0000others is sysu30k; any "
    "other tree needs --layout",
    "features": "features file (safetensors: features, ids, cameras) instead of images",
    "precision": "fp32 (TF32 off) | bf16 (autocast) | auto (sysu30k: fp32; otherwise bf16 on "
    "GPU, fp32 on CPU)",
    "flip_fusion": "legacy-triplet: normalise(image) + mirror, then normalise (the paper's "
    "script) | sum: image + mirror, then normalise (torchreid). Default: legacy-triplet for "
    "sysu30k, else sum",
    "ap": "trapezoid (Market devkit, the paper's script) | standard (torchreid). "
    "Default: trapezoid for sysu30k, else standard",
    "denominator": "all queries (the paper's script, MATLAB devkit) | valid queries "
    "(torchreid). Default: all for sysu30k, else valid",
    "compat": "triplet-script (trapezoid, all, legacy-triplet) | torchreid (standard, valid, "
    "sum): presets that win over the layout's defaults",
    "workers": "decoding processes per rank (default: min(8, CPUs))",
    "junk_identical": "byte-identical query/gallery pairs are junk (default: on for imagefolder)",
    "junk_class": "imagefolder gallery class that is junk (repeatable; default: -1)",
    "camera_regex": "imagefolder: regex on the file name, one group = camera number",
    "cache_dtype": "fp32 | fp16 (halves the cache; may flip near-tie ranks)",
    "nproc": "extract with N torchrun processes; 0 = this process only",
    "query": "query image folder (instead of --data)",
    "gallery": "gallery image folder (instead of --data)",
    "flip": "add the mirrored image",
    "batch_size": "images per forward pass (per process)",
    "ties": "pessimistic (a tied negative ranks ahead) | optimistic",
    "metric": "cosine | euclidean",
    "max_rank": "CMC curve length",
    "mem_budget": "memory for one query block while ranking",
    "recompute": "ignore the features and ranks caches",
    "device": "auto | cpu | cuda | cuda:N",
    "cmc_log_x": "logarithmic rank axis in cmc.png",
}


@user_errors
def command(
    weights: Annotated[Path | None, typer.Argument(metavar="WEIGHTS", help=WEIGHTS_HELP)] = None,
    data: Annotated[Path | None, Opt(metavar="DIR", help=_H["data"])] = None,
    query: Annotated[Path | None, Opt(metavar="DIR", help=_H["query"])] = None,
    gallery: Annotated[Path | None, Opt(metavar="DIR", help=_H["gallery"])] = None,
    layout: Annotated[
        str | None, Opt(metavar="sysu30k|market1501|imagefolder", help=_H["layout"])
    ] = None,
    out: Annotated[Path, Opt(metavar="DIR", help=_H["out"])] = Path("runs/reid"),
    query_features: Annotated[Path | None, Opt(metavar="FILE", help=_H["features"])] = None,
    gallery_features: Annotated[Path | None, Opt(metavar="FILE", help=_H["features"])] = None,
    part: Part = "online",
    flip: Annotated[bool, Opt("--flip/--no-flip", help=_H["flip"])] = True,
    flip_fusion: Annotated[
        str | None, Opt(metavar="legacy-triplet|sum", help=_H["flip_fusion"])
    ] = None,
    precision: Annotated[str, Opt(metavar="fp32|bf16|auto", help=_H["precision"])] = "auto",
    batch_size: Annotated[int, Opt(metavar="N", help=_H["batch_size"])] = 128,
    workers: Annotated[int | None, Opt(metavar="N", help=_H["workers"])] = None,
    device: Annotated[str, Opt(metavar="auto|cpu|cuda|cuda:N", help=_H["device"])] = "auto",
    ap: Annotated[str | None, Opt(metavar="trapezoid|standard", help=_H["ap"])] = None,
    denominator: Annotated[str | None, Opt(metavar="all|valid", help=_H["denominator"])] = None,
    ties: Annotated[str, Opt(metavar="pessimistic|optimistic", help=_H["ties"])] = "pessimistic",
    metric: Annotated[str, Opt(metavar="cosine|euclidean", help=_H["metric"])] = "cosine",
    max_rank: Annotated[int, Opt(metavar="N", help=_H["max_rank"])] = 50,
    mem_budget: Annotated[str, Opt(metavar="SIZE", help=_H["mem_budget"])] = "1GiB",
    junk_identical: Annotated[
        bool | None, Opt("--junk-identical/--no-junk-identical", help=_H["junk_identical"])
    ] = None,
    junk_class: Annotated[list[str] | None, Opt(metavar="CLASS", help=_H["junk_class"])] = None,
    camera_regex: Annotated[str | None, Opt(metavar="REGEX", help=_H["camera_regex"])] = None,
    cache_dtype: Annotated[str, Opt(metavar="fp32|fp16", help=_H["cache_dtype"])] = "fp32",
    recompute: Annotated[bool, Opt("--recompute", help=_H["recompute"])] = False,
    compat: Annotated[
        str | None, Opt(metavar="triplet-script|torchreid", help=_H["compat"])
    ] = None,
    nproc_per_node: Annotated[int, Opt(metavar="N", help=_H["nproc"])] = 0,
    cmc_log_x: Annotated[bool, Opt("--cmc-log-x", help=_H["cmc_log_x"])] = False,
    trust_pickle: TrustPickle = False,
) -> None:
    from sslctl import api  # imports torch: only when the command runs

    opts = api.EvalReidOptions(
        weights=weights, part=part, data=data, query=query, gallery=gallery, layout=layout,
        query_features=query_features, gallery_features=gallery_features, out=out, flip=flip,
        flip_fusion=flip_fusion, precision=precision, batch_size=batch_size, workers=workers,
        device=device, ap=ap, denominator=denominator, ties=ties, metric=metric,
        max_rank=max_rank, mem_budget=parse_size(mem_budget), junk_identical=junk_identical,
        junk_classes=tuple(junk_class or ("-1",)), camera_regex=camera_regex,
        cache_dtype=cache_dtype, recompute=recompute, compat=compat, cmc_log_x=cmc_log_x,
        trust_pickle=trust_pickle,
    )  # fmt: skip
    if nproc_per_node > 0:
        from sslctl.api.eval_reid import validate

        checked = validate(opts)  # a refusal before torchrun starts N processes
        argv = sys.argv[1:]
        if layout is None and checked.layout is not None:  # detected once, here
            argv = [*argv, "--layout", str(checked.layout)]
        relaunch_if_asked(nproc_per_node, argv=argv)
    res = api.eval_reid(**vars(opts))
    if not res.results:  # ranks other than 0 under torchrun
        return
    out_console.print(_table(res.results))
    if query_features is not None:
        source = "features from files"
    elif res.extracted:
        source = f"features extracted: {', '.join(res.extracted)}"
    else:
        source = "features cached"
    written = f"results {res.results_path} and {res.run_results_path}"
    plots = f"CMC plot {res.plot_path} and {res.run_plot_path}"
    out_console.print(f"{source}; {written}; {plots}", markup=False, soft_wrap=True)
