"""What the evaluation commands share: their options' and results' bases, and their run.

``CallerPaths``: a base of frozen options dataclasses, so that Python callers may give paths as
str or any os.PathLike. ``EvalResult``: the content of results.json and where it was written.
``run_locked``: the evaluation in the torchrun process group (or this one process), OUT locked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sslctl import dist, paths_as_path, rundir

R = TypeVar("R")


class CallerPaths:
    """Base of an options dataclass: str and os.PathLike paths from Python callers become Path
    (and a PathLike given for a str field its str)."""

    def __post_init__(self) -> None:
        paths_as_path(self)


@dataclass(frozen=True)
class EvalResult:
    results: dict[str, Any]  # the content of results.json ({} on ranks other than 0)
    results_path: Path | None  # OUT/results.json (None on ranks other than 0)


def run_locked(out: Path, device: str, evaluate: Callable[[dist.DistInfo], R]) -> R:
    """``evaluate(the process group)`` with OUT's lock held by rank 0; the process group is
    shut down however it ends."""
    di = dist.init(device)
    try:
        with rundir.lock_on_main(out, di.is_main):
            return evaluate(di)
    finally:
        dist.shutdown()
