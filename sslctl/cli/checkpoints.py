"""``sslctl checkpoints RUN``: list checkpoints with step, epoch, size and verification."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from sslctl.cli.common import out_console, user_errors

HELP = "List a run's checkpoints: step, epoch, size, and whether each verifies (sha256 manifest)."


@user_errors
def command(
    run: Annotated[
        Path, typer.Argument(metavar="RUN", help="run directory (or its checkpoints/ folder)")
    ],
) -> None:
    from sslctl.api.checkpoints import list_run  # torch: imported when the command runs

    rows = list_run(run)
    table = Table(title=f"checkpoints in {escape(str(run))}")
    for col in ("step", "epoch", "in-epoch position", "size", "verified"):
        table.add_column(col, justify="right" if col != "verified" else "left")
    newest = max((r.step for r in rows if r.verified), default=None)
    for r in rows:
        mark = "[green]yes[/]" if r.verified else f"[red]no[/] ({escape(r.reason)})"
        if r.step == newest:
            mark += "  ← resume point"
        pos = "-" if r.position is None else str(r.position)
        epoch = "-" if r.epoch is None else str(r.epoch)
        table.add_row(str(r.step), epoch, pos, f"{r.size_bytes / 2**20:.1f} MiB", mark)
    out_console.print(table)
    if not rows:
        out_console.print("no checkpoints yet")
