"""Rank-0 Rich console and progress bar, and the JSONL metrics writer."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sslctl import UserError

console = Console(stderr=True, highlight=False)


def _is_main() -> bool:
    """Rank 0 of a process group, or a process that never imported ``sslctl.dist`` (and so has
    no group): ``sslctl report`` logs without loading torch."""
    d = sys.modules.get("sslctl.dist")
    return True if d is None else bool(d.is_main())


def info(msg: str) -> None:
    """One line on stderr (rank 0), printed as given: paths and values with ``[`` in them are
    not read as Rich markup."""
    if _is_main():
        console.print(escape(msg))


def warn(msg: str) -> None:
    if _is_main():
        console.print(f"[yellow]warning:[/] {escape(msg)}")


def make_progress(
    description: str = "train", unit: str = "", plain_every_s: float = 0.0
) -> Progress | PlainProgress:
    """A progress bar with rate and ETA; disabled (prints nothing) on ranks other than 0.

    When the console (stderr) is not a terminal — a Slurm output file, ``2>&1 | tee`` — a live bar
    would print nothing until it ends, so plain lines are printed instead (``PlainProgress``):
    one per update that carries ``stats`` (pretrain and linear-eval pass them every log_every
    steps), at most one per ``plain_every_s`` seconds, and a last one when the task completes.
    ``unit`` names what is counted in those lines ("step", "images").
    """
    if not console.is_terminal:
        return PlainProgress(unit, plain_every_s, enabled=_is_main())
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not _is_main(),
        transient=False,
    )


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class _PlainTask:
    description: str
    total: float | None
    completed: float
    stats: str
    started: float  # perf_counter at add_task
    start_completed: float  # completed at add_task (a resumed run starts part-way)
    printed_at: float  # perf_counter of the last line
    printed_completed: float | None = None  # completed at the last line


class PlainProgress:
    """``make_progress``'s stand-in for a console that is not a terminal: plain lines such as
    ``pretrain: step 120/1000 (12%)  epoch 3.20  loss 1.2345  lr 0.0048  351.0 img/s  elapsed
    0:01:10  ETA 0:09:54``. Takes the calls the engine makes on rich's Progress (``add_task``,
    ``update`` with completed/advance/stats), so callers need not know which one they hold."""

    def __init__(self, unit: str = "", every_s: float = 0.0, enabled: bool = True):
        self.unit, self.every_s, self.enabled = unit, every_s, enabled
        self.tasks: list[_PlainTask] = []
        self._lock = threading.Lock()  # data check advances from its decoding threads

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(
        self, description: str, total: float | None = None, completed: float = 0, **fields: Any
    ) -> TaskID:
        now = time.perf_counter()
        stats = str(fields.get("stats", ""))
        self.tasks.append(_PlainTask(description, total, completed, stats, now, completed, now))
        return TaskID(len(self.tasks) - 1)

    def update(
        self,
        task: TaskID,
        *,
        completed: float | None = None,
        advance: float | None = None,
        stats: str | None = None,
        **_: Any,
    ) -> None:
        with self._lock:
            t = self.tasks[task]
            if completed is not None:
                t.completed = completed
            if advance:
                t.completed += advance
            if stats is not None:
                t.stats = stats
            now = time.perf_counter()
            due = (stats is not None or self.every_s > 0) and now - t.printed_at >= self.every_s
            done = t.total is not None and t.completed >= t.total
            if not (due or done) or t.printed_completed == t.completed:
                return
            t.printed_at, t.printed_completed = now, t.completed
            text = self.line(t, now)
        if self.enabled:
            console.print(text, markup=False, highlight=False, soft_wrap=True)

    def advance(self, task: TaskID, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def line(self, t: _PlainTask, now: float) -> str:
        elapsed = now - t.started
        unit = f"{self.unit} " if self.unit else ""
        head = f"{t.description}: {unit}{t.completed:g}"
        eta = ""
        if t.total:
            head += f"/{t.total:g} ({100 * t.completed / t.total:.0f}%)"
            rate = (t.completed - t.start_completed) / max(elapsed, 1e-9)
            left = (t.total - t.completed) / rate if rate > 0 else float("inf")
            eta = f"  ETA {_hms(left)}"
        stats = f"  {t.stats}" if t.stats else ""
        return f"{head}{stats}  elapsed {_hms(elapsed)}{eta}"


def step_stats(rec: Mapping[str, Any]) -> str:
    """A metrics record's epoch, loss, lr and img/s as the progress display shows them."""
    parts = []
    for key, fmt in (("epoch", "epoch {:.2f}"), ("loss", "loss {:.4f}"), ("lr", "lr {:.3g}")):
        if isinstance(rec.get(key), (int, float)):
            parts.append(fmt.format(rec[key]))
    if isinstance(rec.get("img_s"), (int, float)):
        parts.append(f"{rec['img_s']:.1f} img/s")
    return "  ".join(parts)


TENSORBOARD_MISSING = (
    "log.tensorboard (--tensorboard) needs the tensorboard package: "
    "pip install 'sslctl[tensorboard]' (or: pip install tensorboard), or turn it off"
)


def require_tensorboard() -> None:
    """Refuse --tensorboard before any work when the package is missing (one line)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(TENSORBOARD_MISSING)


def _tensorboard_writer(tb_dir: Path, first_step: int) -> Any:
    """torch's SummaryWriter, imported only here. ``purge_step``: a resumed run's metrics.jsonl
    lost the records after its checkpoint; TensorBoard hides the same steps of the earlier
    event file, so the curves match metrics.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(TENSORBOARD_MISSING) from None
    purge = first_step if first_step > 0 else None
    return SummaryWriter(log_dir=str(tb_dir), purge_step=purge, flush_secs=30)


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends one JSON object per line; rank 0 only; flushed per record so a crash loses none.

    With ``tb_dir`` (log.tensorboard), every numeric value of a record that has a ``step`` is
    also written there as a TensorBoard scalar of the same name at that step (``first_step``:
    the first step this writer will record; events of an earlier start from there on are
    purged, as metrics.jsonl was truncated to the checkpoint).
    """

    def __init__(self, path: Path | None, tb_dir: Path | None = None, first_step: int = 0):
        self._fh: IO[str] | None = None
        self._tb: Any = None
        if path is not None and _is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tb_dir is not None and _is_main():
            self._tb = _tensorboard_writer(tb_dir, first_step)

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        now = round(time.time(), 3)
        rec = {"time": now, **{k: _clean(v) for k, v in record.items()}}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self._tb is not None and _scalar(record.get("step")):
            for k, v in record.items():
                if k != "step" and _scalar(v):
                    self._tb.add_scalar(k, float(v), int(record["step"]), walltime=now)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


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
