"""One-line messages about user input: ``quote`` (a path or line as a message may show it) and
``warn`` (a warning printed whole, on rank 0). Imports nothing heavy, so that any module (also
below ``sslctl.data``) may use it.
"""

from __future__ import annotations

import os
import re

QUOTE_LIMIT = 200  # characters of a path or line that a message quotes at most
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``value`` (a path or a line) as it may appear in a one-line message: at most ``limit``
    characters, then "… (N characters)" (a 50 MB list-file line prints 200 characters, not
    50 MB), with control characters, line separators and undecodable bytes (surrogates from
    the file system) escaped, so that a name holding a newline cannot split the line and one
    holding an undecodable byte cannot make printing fail."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bytes | os.PathLike):
        text = os.fsdecode(value)
    else:
        text = str(value)
    shown = _CONTROL.sub(_escape_char, text[:limit])
    if len(text) > limit or len(shown) > limit:
        return f"{shown[:limit]}… ({len(text):,} characters)"
    return shown


def _escape_char(m: re.Match[str]) -> str:
    return m.group().encode("unicode_escape", "backslashreplace").decode("ascii")


def warn(msg: str) -> None:
    """A warning as one line, however long (soft-wrapped: a log keeps it whole), rank 0 only."""
    from rich.markup import escape

    from sslctl import dist, log  # imported late: they pull in torch

    if dist.is_main():
        log.console.print(f"[yellow]warning:[/] {escape(msg)}", soft_wrap=True)
