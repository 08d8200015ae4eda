"""``sslctl data check``: report unreadable and odd image files, write the clean index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from sslctl import api
from sslctl.api.data_check import DataCheckResult, handling
from sslctl.cli.common import out_console, user_errors

HELP = (
    "Decode-test every image under DIR once (ImageFolder tree, or --list-file), count odd and "
    "unusable files by kind (truncated, zero-byte, not-an-image, PNG named .JPEG, CMYK, "
    "grayscale, ...), and cache the clean index that the DALI backend uses (pre-training "
    "builds it itself when missing). Re-runs only decode files that changed."
)

app = typer.Typer(name="data", help="Data set tools.", no_args_is_help=True, add_completion=False)

EXIT_FOUND_UNUSABLE = 1


def _table(r: DataCheckResult) -> Table:
    t = Table(title=f"{r.root}: {r.total:,} images, {r.usable:,} usable")
    t.add_column("kind")
    t.add_column("files", justify="right")
    t.add_column("pre-training")
    for kind, n in r.counts.items():
        if n or kind == "ok":
            t.add_row(kind, f"{n:,}", handling(kind))
    return t


@app.command("check", help=HELP)
@user_errors
def command(
    root: Annotated[Path, typer.Argument(help="data folder (ImageFolder root or list-file root)")],
    list_file: Annotated[
        Path | None, typer.Option(help="'relative/path [label]' list under DIR (data.list_file)")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="decode threads (default: CPU count)")] = None,
    rescan: Annotated[
        bool, typer.Option(help="ignore the cached index; decode everything")
    ] = False,
    show: Annotated[int, typer.Option(help="list up to N odd or unusable files")] = 20,
    strict: Annotated[bool, typer.Option(help="exit 1 when any file is unusable")] = False,
) -> None:
    r = api.data_check(root, list_file, threads, rescan)
    out_console.print(_table(r))
    for path, kind, reason in r.odd[: max(0, show)]:
        line = f"  {kind:<15} {path}" + (f"  ({reason})" if reason else "")
        out_console.print(escape(line), soft_wrap=True)
    if len(r.odd) > show:
        out_console.print(f"  … and {len(r.odd) - show:,} more")
    if r.skipped.total:
        line = f"skipped by the scan, not in the index: {r.skipped.describe()}"
        out_console.print(escape(line), soft_wrap=True)
    out_console.print(
        f"index: {r.index_path} ({r.checked:,} file(s) decoded now, {r.seconds:.1f} s)",
        soft_wrap=True,
    )
    if strict and r.usable < r.total:
        raise typer.Exit(EXIT_FOUND_UNUSABLE)
