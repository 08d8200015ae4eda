"""``sslctl checkpoints RUN``: what a run directory holds, and whether each checkpoint verifies."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from sslctl import UserError, checkpoint


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    epoch: int | None
    position: int | None  # micro-batches of `epoch` already consumed
    size_bytes: int
    verified: bool
    reason: str  # "ok" or why it does not verify
    weights: Path


def list_run(run: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every checkpoint of a run (a pretrain or linear-eval ``--out``, or its checkpoints/
    folder), oldest first: step, epoch, in-epoch position, size, and whether it verifies."""
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run}: no such run directory")
    if not run.is_dir():
        raise UserError(f"{run}: a file, not a run directory (give a pretrain --out)")
    directory = checkpoint.ckpt_dir_of(run)
    if directory == run and not checkpoint.list_checkpoints(run) and not _is_run(run):
        raise UserError(
            f"{run}: not a run directory (no checkpoints/, config.yaml or step_* files); give a "
            "pretrain or linear-eval --out, or its checkpoints/ folder"
        )
    out = []
    for c in checkpoint.list_checkpoints(directory):
        ok, why = checkpoint.verify(c)
        epoch = position = None
        # a manifest that cannot be read: its row says why it does not verify
        with contextlib.suppress(OSError, ValueError):
            m = checkpoint.read_manifest(c.manifest)
            epoch, position = m.get("epoch"), m.get("position")
        size = sum(f.stat().st_size for f in (c.weights, c.state, c.manifest) if f.is_file())
        out.append(CheckpointInfo(c.step, epoch, position, size, ok, why, c.weights))
    return out


def _is_run(d: Path) -> bool:
    """A run directory before its first checkpoint: it has what pretrain writes at start."""
    return any((d / n).exists() for n in ("config.yaml", "metrics.jsonl", ".lock"))
