"""Rank-0 Rich console and progress bar, and the JSONL metrics writer."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sslctl import dist

console = Console(stderr=True, highlight=False)


def info(msg: str) -> None:
    """One line on stderr (rank 0), printed as given: paths and values with ``[`` in them are
    not read as Rich markup."""
    if dist.is_main():
        console.print(escape(msg))


def warn(msg: str) -> None:
    if dist.is_main():
        console.print(f"[yellow]warning:[/] {escape(msg)}")


def make_progress(description: str = "train") -> Progress:
    """A progress bar with rate and ETA; disabled (prints nothing) on ranks other than 0."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not dist.is_main(),
        transient=False,
    )


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends one JSON object per line; rank 0 only; flushed per record so a crash loses none."""

    def __init__(self, path: Path | None):
        self._fh: IO[str] | None = None
        if path is not None and dist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        rec = {"time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records with ``step > max_step`` (work lost by a crash), rewriting atomically."""
    if not path.is_file():
        return
    keep = []
    dropped = False
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                dropped = True
                continue  # a line torn by a kill
            if int(rec.get("step", 0)) > max_step:
                dropped = True
            elif line.endswith("\n"):
                keep.append(line)
            else:  # a whole record whose newline was lost
                keep.append(line + "\n")
                dropped = True
    if not dropped:
        return  # nothing lost: leave the file (and its mtime) alone
    tmp = path.with_name(f".sslctl-tmp.{path.name}")  # removed at start-up if a kill leaves it
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


def is_tty() -> bool:
    return sys.stderr.isatty()
