"""What every command shares: the one-line error convention and small option helpers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from sslctl import UserError, entry

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

# Shared by every command that reads weights (extract, linear-eval, knn-eval, eval-reid).
TRUST_PICKLE_HELP = (
    "allow a .pth that needs full unpickling (runs code stored in the file; only for files "
    "whose author you trust)"
)

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
