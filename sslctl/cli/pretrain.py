"""``sslctl pretrain``: self-supervised pre-training (one process, or torchrun DDP)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from sslctl import api
from sslctl.cli.common import out_console, user_errors

HELP = (
    "Pre-train a backbone with a profile (Triplet or BYOL). Resumes from the newest verified "
    "checkpoint in --out unless --fresh. Exit code 0 when done or stopped by --max-steps, "
    "3 when stopped by a signal after checkpointing (rerun the same command to resume)."
)

EXIT_PREEMPTED = 3


@user_errors
def command(
    profile: Annotated[
        str, typer.Option(help="bundled profile name (see `sslctl profiles`) or a YAML file")
    ],
    out: Annotated[
        Path, typer.Option(help="run directory (config.yaml, metrics.jsonl, checkpoints/)")
    ],
    data: Annotated[
        Path | None, typer.Option(help="training images: ImageFolder root (or root of list_file)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a config key: --set optim.lr=2.4 (repeatable)"),
    ] = None,
    resume: Annotated[
        str, typer.Option(help="auto (newest verified in --out), none, or a checkpoint path")
    ] = "auto",
    fresh: Annotated[
        bool, typer.Option(help="start from scratch; refuse if --out already holds checkpoints")
    ] = False,
    max_steps: Annotated[
        int | None, typer.Option(help="stop (and checkpoint) after N optimizer steps")
    ] = None,
    nproc_per_node: Annotated[
        int, typer.Option(help="launch N processes with torchrun (DDP); 0 = this process only")
    ] = 0,
) -> None:
    if nproc_per_node > 0:
        from sslctl.cli.launch import relaunch_with_torchrun

        raise typer.Exit(relaunch_with_torchrun(nproc_per_node, sys.argv[1:]))
    res = api.pretrain(profile, out, data, set_ or [], resume, fresh, max_steps)
    f = res.fit
    if int(os.environ.get("RANK", "0")) == 0:
        out_console.print(
            f"pretrain {f.stopped}: step {f.step}, epoch {f.epoch}, loss {f.last_loss:.4f}, "
            f"{f.images_per_s:.1f} img/s; checkpoint {f.checkpoint}"
        )
    if f.stopped == "signal":
        raise typer.Exit(EXIT_PREEMPTED)
