"""``sslctl extract``: the backbone of a checkpoint as torchvision-loadable weights (ResNets),
or as sslctl ConvNet4 weights (convnet4)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslctl.cli.common import Network, TrustPickle, out_console, user_errors

# torch (through sslctl.api) is imported inside the command: `sslctl --help` stays fast.

HELP = (
    "Write a checkpoint's backbone with torchvision key names (no fc) as .safetensors or a .pth "
    "state dict, load-checked in torchvision before it is written (convnet4: in sslctl's "
    "ConvNet4)."
)


@user_errors
def command(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="SOURCE",
            help="checkpoint file, run or checkpoints directory, .../last, or .pth",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="file to write")],
    part: Network = "online",
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            metavar="safetensors|torchvision",
            help="safetensors or torchvision (.pth); default: from the suffix",
        ),
    ] = None,
    trust_pickle: TrustPickle = False,
) -> None:
    from sslctl import api

    r = api.extract(source, output, part, fmt, trust_pickle)
    stem = ", 3x3 small-image stem" if r.small_stem else ""
    out_console.print(
        f"wrote {r.output} ({r.format}): {r.arch} {r.part} backbone{stem}, method {r.method}, "
        f"step {r.step}, from {r.source} ({r.source_kind}); {r.tensors} tensors, "
        f"{r.parameters / 1e6:.2f}M parameters",
        soft_wrap=True,
        markup=False,
    )
    missing = r.missing_in_torchvision
    out_console.print(
        f"checked: {r.checked_with} loads it with "
        + (f"only {', '.join(missing)} missing" if missing else "nothing missing"),
        soft_wrap=True,
        markup=False,
    )
    if r.counters_added:
        out_console.print(
            f"note: {r.counters_added} BN num_batches_tracked absent in the source, written as 0",
            markup=False,
        )
