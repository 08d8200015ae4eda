"""``sslctl convert-detectron``: a backbone as a detectron2 pickle, plus fine-tuning configs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslctl.cli.common import Network, TrustPickle, out_console, user_errors

HELP = (
    "Convert a backbone to detectron2's .pkl, checked against its full ResNet parameter list; "
    "--configs DIR adds COCO and VOC R50-C4 fine-tuning configs (--configs-style reference: the "
    "paper's code as committed; moco: detectron2's step schedule, VOC 24k)."
)


@user_errors
def command(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="SOURCE", help="extracted backbone, checkpoint file, run directory, or .pth"
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", metavar="FILE.pkl", help="detectron2 weights to write (.pkl)"
        ),
    ],
    part: Network = "online",
    configs: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="also write detectron2 configs and train_net.py here"),
    ] = None,
    configs_style: Annotated[
        str,
        typer.Option(
            metavar="reference|moco",
            help="reference (lr 0.05, warm-up + cosine, 180k iterations, as the paper's code) "
            "or moco (lr 0.02, step schedule, VOC 24k)",
        ),
    ] = "reference",
    trust_pickle: TrustPickle = False,
) -> None:
    from sslctl import api  # torch: imported when a command runs, not for --help

    r = api.convert_detectron(source, output, part, configs, configs_style, trust_pickle)
    out_console.print(
        f"wrote {r.output}: {r.arch} from {r.source} ({r.source_kind}); {r.tensors} tensors, "
        f"exactly detectron2's {r.arch} backbone names, BN running statistics included "
        f"({r.counters_dropped} num_batches_tracked dropped: detectron2 does not load them)",
        soft_wrap=True,
        markup=False,
    )
    for f in r.configs:
        out_console.print(f"wrote {f}", soft_wrap=True, markup=False)
    if r.commands:
        out_console.print("fine-tune with (one line per benchmark):")
        for c in r.commands:
            out_console.print(f"  {c}", soft_wrap=True, markup=False)
