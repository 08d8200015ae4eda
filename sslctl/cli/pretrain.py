"""``sslctl pretrain``: self-supervised pre-training (one process, or torchrun DDP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from sslctl.cli.common import (
    EXIT_PREEMPTED,
    Nproc,
    err_console,
    out_console,
    set_option,
    user_errors,
)
from sslctl.cli.launch import relaunch_if_asked

HELP = (
    "Pre-train a backbone with a profile (Triplet or BYOL). Continues the run in --out from its "
    "newest verified checkpoint; refuses surprises (older checkpoints, changed settings, "
    "nothing that verifies) unless told --fresh, --rewind or --allow-changes. Exit codes: 0 done "
    "(or stopped by --max-steps, or nothing left to do), 2 a mistake to fix (one line), 3 stopped "
    "by a signal after checkpointing (rerun the same command to resume), 4 training diverged "
    "(the newest finite checkpoint is kept and named)."
)

EXIT_DIVERGED = 4


@user_errors
def command(
    profile: Annotated[
        str,
        typer.Option(
            metavar="NAME|FILE", help="bundled profile name (see `sslctl profiles`) or a YAML file"
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            metavar="DIR", help="run directory (config.yaml, metrics.jsonl, checkpoints/)"
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR", help="training images: ImageFolder root (or root of list_file)"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, set_option("override a config key: --set optim.lr=2.4 (repeatable)")
    ] = None,
    resume: Annotated[
        str,
        typer.Option(
            metavar="auto|none|PATH",
            help="auto (the newest verified checkpoint in --out), none (from scratch), or a "
            "checkpoint path; one that is not --out's newest needs --rewind",
        ),
    ] = "auto",
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="start over: move --out's checkpoints and metrics.jsonl to --out/superseded/<time>/ first",
        ),
    ] = False,
    rewind: Annotated[
        bool,
        typer.Option(
            "--rewind",
            help="continue from an older --resume PATH: move --out's checkpoints and metrics.jsonl "
            "to --out/superseded/<time>/ first",
        ),
    ] = False,
    allow_changes: Annotated[
        bool,
        typer.Option(
            "--allow-changes",
            help="resume even though settings differ from the run's (recorded in metrics.jsonl and status.json)",
        ),
    ] = False,
    max_steps: Annotated[
        int | None, typer.Option(metavar="N", help="stop (and checkpoint) after N optimizer steps")
    ] = None,
    nproc_per_node: Nproc = 0,
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard",
            help="also write the metrics as TensorBoard events under --out/tb/ (the same as "
            "--set log.tensorboard=true; needs pip install 'sslctl[tensorboard]')",
        ),
    ] = False,
) -> None:
    relaunch_if_asked(nproc_per_node)
    from sslctl import api, dist  # torch: imported when a command runs, not for --help

    sets = [*(set_ or []), *(["log.tensorboard=true"] if tensorboard else [])]
    try:
        res = api.pretrain(
            profile, out, data, sets, resume, fresh, max_steps, rewind, allow_changes
        )
    except api.Diverged as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(EXIT_DIVERGED) from None
    f = res.fit
    if dist.is_main():
        if f.stopped == "complete":
            out_console.print(
                f"pretrain complete: step {f.step}; checkpoint {f.checkpoint}", markup=False
            )
        else:
            out_console.print(
                f"pretrain {f.stopped}: step {f.step}, epoch {f.epoch}, loss {f.last_loss:.4f}, "
                f"{f.images_per_s:.1f} img/s; checkpoint {f.checkpoint}",
                markup=False,
            )
    if f.stopped == "signal":
        raise typer.Exit(EXIT_PREEMPTED)
