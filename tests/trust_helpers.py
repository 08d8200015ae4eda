"""A .pth whose unpickling runs code (creates a marker file): for the --trust-pickle tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision import models


class _Payload:
    """Unpickling this opens (creates) the marker file: a stand-in for code hidden in a .pth."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def booby_trapped(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": models.resnet18().state_dict(), "x": _Payload(marker)}, evil)
    return evil, marker
