"""What every command shares: the one-line error convention, the exit codes, and the options
(and their help) that several commands declare alike."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from sslctl import UserError, entry

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

Opt = typer.Option

# Shared by every command that reads weights (extract, linear-eval, knn-eval, eval-reid).
TRUST_PICKLE_HELP = (
    "allow a .pth that needs full unpickling (runs code stored in the file; only for files "
    "whose author you trust)"
)
WEIGHTS_HELP = "checkpoint (file, run dir, …/last), extracted backbone or torchvision .pth"
NPROC_HELP = "launch N processes with torchrun (DDP); 0 = this process only"
PART_HELP = "online | target backbone of an sslctl checkpoint"  # the evaluations
NETWORK_HELP = "online or target network (sslctl checkpoints)"  # extract, convert-detectron

SPLIT_HELP = "folder or list file of 'relative/path label' lines (relative to --data)"

TrustPickle = Annotated[bool, Opt("--trust-pickle", help=TRUST_PICKLE_HELP)]
Network = Annotated[str, Opt(metavar="online|target", help=NETWORK_HELP)]
Part = Annotated[str, Opt(metavar="online|target", help=PART_HELP)]
Nproc = Annotated[int, Opt(metavar="N", help=NPROC_HELP)]

# The options linear-eval and knn-eval share.
Weights = Annotated[Path, typer.Argument(metavar="WEIGHTS", help=WEIGHTS_HELP)]
Data = Annotated[
    str | None,
    Opt(
        metavar="DIR|bundled",
        help="root with train/ and val/ (ImageFolder), or 'bundled' (the demo digits)",
    ),
]
Profile = Annotated[
    str | None,
    Opt(
        metavar="NAME|FILE",
        help="linear-eval profile (see `sslctl profiles`) or YAML file "
        "(default: linear-demo-cpu for --data bundled, else linear-r50)",
    ),
]
CompareRandom = Annotated[
    bool,
    Opt(
        "--compare-random",
        help="also evaluate a seeded random initialisation of the same architecture",
    ),
]
CacheDir = Annotated[Path | None, Opt(metavar="DIR", help="cached features (default: OUT/cache)")]
Recompute = Annotated[bool, Opt("--recompute", help="ignore cached features")]
Device = Annotated[
    str,
    Opt(
        metavar="auto|cpu|cuda|cuda:N", help="auto | cpu | cuda | cuda:N (checked before any work)"
    ),
]


def split_option(what: str) -> Any:
    """``--train`` / ``--val``: a split of the data, ``what`` first in the help."""
    return Opt(metavar="PATH", help=f"{what}: {SPLIT_HELP}")


def set_option(help: str) -> Any:
    """The repeatable ``--set KEY=VALUE`` option (a profile key override), with ``help``."""
    return Opt("--set", metavar="KEY=VALUE", help=help)


EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3  # stopped by a signal after checkpointing: rerun to resume


def user_errors(fn: F) -> F:
    """Turn UserError (and a few OS errors a user causes) into one line on stderr + exit 2, and
    Ctrl-C (KeyboardInterrupt) into the line ``received SIGINT: stopped`` + exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            entry.command_started()
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            err_console.print(entry.STOPPED_MESSAGE, markup=False)
            raise typer.Exit(entry.EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]
