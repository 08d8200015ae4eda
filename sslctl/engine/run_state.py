"""The run state both trainers share (pre-training's fit loop and the standard linear probe).

Where a run is (``Position``), the agreed checkpoint write (rank 0 saves and prunes, every rank
learns whether it worked), finding and reading the checkpoint to continue from (and dropping
the metrics records past it), RUN/status.json and config.yaml, the stop flag a run holds from
start to end, and the errors that halt a run.
Nothing here imports the fit loop, so ``sslctl.eval`` can use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sslctl import UserError, __version__, checkpoint, dist, files, last_line, log
from sslctl.config import Config, to_yaml
from sslctl.engine.preempt import StopFlag


class TrainingHalted(UserError):
    """The run stopped itself for a reason the user must look at (non-finite loss, disk full)."""


class Diverged(TrainingHalted):
    """Training went non-finite: nothing was saved from it (the CLI exits with code 4)."""


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch: int = 0  # (micro-)batches of `epoch` already consumed

    def state(self, world_size: int) -> dict[str, int]:
        """The position's entries of a checkpoint's train state."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch,
            "world_size": world_size,
        }

    @staticmethod
    def of(state: dict[str, Any]) -> Position:
        return Position(int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"]))


@dataclass(frozen=True)
class SaveVerdict:
    """What every rank agreed on after a checkpoint write (the texts are rank 0's only)."""

    write_failed: bool
    nonfinite: bool
    error: str  # the write's error, on rank 0
    bad: str  # the non-finite tensors, on rank 0


def save_agreed(
    di: dist.DistInfo,
    ckpt_dir: Path,
    step: int,
    contents: Callable[[], tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]],
    keep_last: int,
    keep: Callable[[dict[str, Any]], bool],
    check_finite: bool = False,
) -> SaveVerdict:
    """Rank 0 writes checkpoint ``step`` (``contents()``: tensors, metadata, train state) and
    prunes to ``keep_last`` (+ those ``keep`` marks); the all-reduce of the outcome is also the
    barrier, so a failed write stops every rank alike instead of hanging the others.
    ``check_finite``: weights with non-finite values are not written (the verdict says so)."""
    error, bad = "", ""
    if di.is_main:
        try:
            tensors, meta, state = contents()
            bad = checkpoint.nonfinite_summary(tensors) if check_finite else ""
            if not bad:
                checkpoint.save(ckpt_dir, step, tensors, meta, state)
                checkpoint.prune(ckpt_dir, keep_last, keep)
        except OSError as e:
            error = files.write_error(e)
        except Exception as e:  # noqa: BLE001 - a writer's own error type (disk full, …):
            error = f"{type(e).__name__}: {last_line(e)}"  # told to every rank, not a hang
    failed = dist.all_reduce_max(
        torch.tensor([float(bool(error)), float(bool(bad))], device=di.device)
    ).tolist()
    return SaveVerdict(bool(failed[0]), bool(failed[1]), error, bad)


def newest_finite(di: dist.DistInfo, ckpt_dir: Path) -> str:
    """Where a diverged run can continue from (every checkpoint written is finite)."""
    ck = checkpoint.newest_valid(ckpt_dir) if di.is_main else None
    if ck is None:
        return "no checkpoint was written before it; start again with a lower optim.lr"
    return (
        f"the newest finite checkpoint is {ck.weights} (step {ck.step}); continue from it "
        "with a lower optim.lr and --allow-changes, or use train.precision=bf16/fp32"
    )


def find_checkpoint(ckpt_dir: Path, resume: str = "auto") -> checkpoint.CkptPaths | None:
    """The checkpoint to continue from: ``auto`` the newest verified one in ``ckpt_dir``
    (skipping damaged ones, each said), ``none`` none, else the given path."""
    if resume == "none":
        return None
    if resume == "auto":
        skip = lambda c, why: log.warn(f"skipping checkpoint {c.weights.name}: {why}")  # noqa: E731
        return checkpoint.newest_valid(ckpt_dir, skip)
    return checkpoint.resolve(Path(resume))


def read_checkpoint(
    ck: checkpoint.CkptPaths,
    check: Callable[[dict[str, torch.Tensor], dict[str, str]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any], Position]:
    """A checkpoint's tensors, metadata, train state and position. ``check(tensors, meta)``
    runs before the train state is read, so that a checkpoint of another run or with
    non-finite weights is refused for that reason first."""
    tensors, meta = checkpoint.load_safetensors(ck.weights)
    if check is not None:
        check(tensors, meta)
    state = checkpoint.load_train_state(ck.state)
    return tensors, meta, state, Position.of(state)


def truncate_metrics(di: dist.DistInfo, metrics: Path, step: int) -> None:
    """Records past the resumed step belong to work that was lost (rank 0 owns the file)."""
    if di.is_main:
        log.truncate_jsonl(metrics, step)


def write_status(
    di: dist.DistInfo,
    run_dir: Path,
    stopped: str,
    pos: Position,
    saved: Path | None,
    data_root: str,
    changes: dict[str, list[Any]],
) -> None:
    """RUN/status.json (rank 0), written atomically: what a wrapper (Slurm requeue) reads to
    decide what to do — why the run stopped, where, and the checkpoint to continue from."""
    if not di.is_main:
        return
    status: dict[str, Any] = {
        "stopped": stopped,
        "step": pos.step,
        "epoch": pos.epoch,
        "checkpoint": str(saved) if saved is not None else None,
        "data_root": data_root,
        "sslctl_version": __version__,
    }
    if changes:
        status["changes"] = changes
    files.write_text(run_dir / "status.json", json.dumps(status) + "\n")


def write_config_record(
    di: dist.DistInfo, run_dir: Path, cfg: Config, step: int, data_root: str
) -> None:
    """RUN/config.yaml (rank 0): exactly what runs from this start (data root, version)."""
    if not di.is_main:
        return
    header = (
        f"# sslctl {__version__}: the configuration this run ran with (the last start: "
        f"step {step})\n# data: {data_root}\n"
    )
    files.write_text(run_dir / "config.yaml", header + to_yaml(cfg))


def status_is(di: dist.DistInfo, run_dir: Path, stopped: str, step: int) -> bool:
    """Whether RUN/status.json already says ``stopped`` at ``step`` (True off rank 0)."""
    if not di.is_main:
        return True
    try:
        old = json.loads((run_dir / "status.json").read_text())
        return bool(old.get("stopped") == stopped and old.get("step") == step)
    except (OSError, ValueError, AttributeError):
        return False


@contextmanager
def stop_flag(entered: StopFlag | None = None) -> Iterator[StopFlag]:
    """The caller's already entered stop flag, or a new one held for the block."""
    if entered is not None:
        yield entered
        return
    with StopFlag() as flag:
        yield flag
