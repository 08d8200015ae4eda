"""``sslctl data check``: report unreadable and odd image files, write the clean index."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from sslctl.cli.common import out_console, user_errors
from sslctl.data.readers import MAX_IMAGE_PIXELS
from sslctl.data.text import quote

if TYPE_CHECKING:
    from sslctl.api.data_check import DataCheckResult

HELP = (
    "Decode-test every image under DIR once (ImageFolder tree, or --list-file), count odd and "
    "unusable files by kind (truncated, zero-byte, not-an-image, PNG named .JPEG, CMYK, "
    "grayscale, multi-frame, huge (over --max-image-pixels, never decoded), ...), and cache "
    "the clean index that the DALI backend uses (pre-training builds it itself when missing). "
    "Re-runs only decode files that changed."
)

app = typer.Typer(
    name="data",
    help="Data set tools.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help text is shown as written ("[label]" stays)
)
EXAMPLES = (
    "\b\nExamples:\n  sslctl data check /data/imagenet/train\n"
    "  sslctl data check /data/sysu --list-file train.txt --strict"
)

EXIT_FOUND_UNUSABLE = 1


def _table(r: DataCheckResult) -> Table:
    from sslctl.api.data_check import handling

    t = Table(title=escape(f"{quote(r.root)}: {r.total:,} images, {r.usable:,} usable"))
    t.add_column("kind")
    t.add_column("files", justify="right")
    t.add_column("pre-training")
    for kind, n in r.counts.items():
        if n or kind == "ok":
            t.add_row(kind, f"{n:,}", handling(kind))
    return t


@app.command("check", help=HELP, epilog=EXAMPLES)
@user_errors
def command(
    root: Annotated[
        Path, typer.Argument(metavar="DIR", help="data folder (ImageFolder root or list-file root)")
    ],
    list_file: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="'relative/path [label]' list under DIR (data.list_file)"
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(metavar="N", help="decode threads (default: CPU count)")
    ] = None,
    rescan: Annotated[
        bool, typer.Option("--rescan", help="ignore the cached index; decode everything")
    ] = False,
    show: Annotated[int, typer.Option(metavar="N", help="list up to N odd or unusable files")] = 20,
    strict: Annotated[
        bool, typer.Option("--strict", help="exit 1 when any file is unusable")
    ] = False,
    max_image_pixels: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="images over this many pixels (width × height, read from the header) are "
            "counted 'huge' and never decoded (data.max_image_pixels)",
        ),
    ] = MAX_IMAGE_PIXELS,
    allow_outside_root: Annotated[
        bool,
        typer.Option(
            "--allow-outside-root",
            help="accept list-file entries outside DIR: absolute paths, '..', symlinks out "
            "(data.allow_outside_root)",
        ),
    ] = False,
) -> None:
    from sslctl import api  # torch: imported when the command runs, not for --help

    r = api.data_check(
        root,
        list_file,
        threads,
        rescan,
        allow_outside_root=allow_outside_root,
        max_image_pixels=max_image_pixels,
    )
    out_console.print(_table(r))
    for path, kind, reason in r.odd[: max(0, show)]:
        line = f"  {kind:<15} {quote(path)}" + (f"  ({quote(reason)})" if reason else "")
        out_console.print(escape(line), soft_wrap=True)
    if len(r.odd) > show:
        out_console.print(f"  … and {len(r.odd) - show:,} more")
    if r.skipped.total:
        line = f"skipped by the scan, not in the index: {r.skipped.describe()}"
        out_console.print(escape(line), soft_wrap=True)
    out_console.print(
        escape(f"index: {r.index_path} ({r.checked:,} file(s) decoded now, {r.seconds:.1f} s)"),
        soft_wrap=True,
    )
    if strict and r.usable < r.total:
        raise typer.Exit(EXIT_FOUND_UNUSABLE)
