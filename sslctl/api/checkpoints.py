"""``sslctl checkpoints RUN``: what a run directory holds, and whether each checkpoint verifies."""

from __future__ import annotations

import json
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


def list_run(run: Path) -> list[CheckpointInfo]:
    if not run.exists():
        raise UserError(f"{run}: no such run directory")
    directory = checkpoint.ckpt_dir_of(run)
    out = []
    for c in checkpoint.list_checkpoints(directory):
        ok, why = checkpoint.verify(c)
        epoch = position = None
        if c.manifest.is_file():
            try:
                m = json.loads(c.manifest.read_text())
                epoch, position = m.get("epoch"), m.get("position")
            except (OSError, ValueError):
                pass
        size = sum(f.stat().st_size for f in (c.weights, c.state, c.manifest) if f.is_file())
        out.append(CheckpointInfo(c.step, epoch, position, size, ok, why, c.weights))
    return out
