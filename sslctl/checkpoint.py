"""Checkpoints: safetensors weights + a separate train-state file + a manifest written last.

A checkpoint named ``step_00001234`` in ``RUN/checkpoints/`` is three files:
- ``step_00001234.safetensors``: weights (``online.backbone.*``, ``online.projector.*``,
  ``predictor.*``, ``target.*``) with string metadata (format, method, arch, config JSON, step).
- ``step_00001234.state.pt``: optimizer, scaler, step, epoch, data position, RNG (tensors and
  plain containers only, so it loads with ``weights_only=True``).
- ``step_00001234.json``: manifest with the sha256 of both files; written last, so a checkpoint
  without a verifying manifest is incomplete and is ignored.
Every file is written to a temp file in the same directory, fsynced and ``os.replace``d.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sslctl import UserError

FORMAT = "sslctl-checkpoint"
FORMAT_VERSION = "1"
_NAME = re.compile(r"^step_(\d{8,})$")
_STRIP = ("module.", "_orig_mod.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's temp files are 0600


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` anywhere in the key."""
    out = {}
    for k, v in state.items():
        for p in _STRIP:
            k = k.replace(p, "")
        out[k] = v
    return out


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows opening a directory
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``; no partial file on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Atomic safetensors write; tensors made contiguous (channels_last models included)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in strip_prefixes(tensors).items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


@dataclass(frozen=True)
class CkptPaths:
    weights: Path
    state: Path
    manifest: Path
    step: int

    @staticmethod
    def of(directory: Path, step: int) -> CkptPaths:
        stem = f"step_{step:08d}"
        return CkptPaths(
            directory / f"{stem}.safetensors",
            directory / f"{stem}.state.pt",
            directory / f"{stem}.json",
            step,
        )


def save(
    directory: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    train_state: dict[str, Any],
) -> CkptPaths:
    """Write one checkpoint (weights, train state, manifest last). Rank 0 only."""
    paths = CkptPaths.of(directory, step)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": str(step), **meta}
    save_safetensors(paths.weights, tensors, meta)
    atomic_write(paths.state, lambda tmp: torch.save(train_state, tmp))
    manifest = {
        "format": FORMAT,
        "step": step,
        "epoch": train_state.get("epoch"),
        "position": train_state.get("batch_in_epoch"),
        "files": {
            paths.weights.name: sha256_file(paths.weights),
            paths.state.name: sha256_file(paths.state),
        },
    }

    def write_manifest(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(manifest, indent=1))

    atomic_write(paths.manifest, write_manifest)
    return paths


def verify(paths: CkptPaths) -> tuple[bool, str]:
    """(ok, reason): the manifest exists, parses and both files match their sha256."""
    if not paths.manifest.is_file():
        return False, "no manifest (incomplete write)"
    try:
        manifest = json.loads(paths.manifest.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"unreadable manifest ({e.__class__.__name__})"
    for f in (paths.weights, paths.state):
        if f.name not in files:
            return False, f"manifest does not list {f.name}"
        if not f.is_file():
            return False, f"{f.name} missing"
        if sha256_file(f) != files[f.name]:
            return False, f"{f.name} does not match its sha256 (corrupt or truncated)"
    return True, "ok"


def list_checkpoints(directory: Path) -> list[CkptPaths]:
    """Every checkpoint named in ``directory`` (by any of its files), oldest first."""
    steps = set()
    if directory.is_dir():
        for p in directory.iterdir():
            m = _NAME.match(p.name.split(".", 1)[0])
            if m and not p.name.startswith("."):
                steps.add(int(m.group(1)))
    return [CkptPaths.of(directory, s) for s in sorted(steps)]


def newest_valid(
    directory: Path, on_skip: Callable[[CkptPaths, str], None] | None = None
) -> CkptPaths | None:
    for c in reversed(list_checkpoints(directory)):
        ok, why = verify(c)
        if ok:
            return c
        if on_skip is not None:
            on_skip(c, why)
    return None


def ckpt_dir_of(path: Path) -> Path:
    """A run directory's checkpoints/ folder, or the folder itself."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def resolve(path: Path) -> CkptPaths:
    """A checkpoint file, a run or checkpoints directory (newest valid), or ``…/last``."""
    if path.name == "last" and not path.exists():
        path = path.parent
    if path.is_dir():
        found = newest_valid(ckpt_dir_of(path))
        if found is None:
            raise UserError(
                f"{path}: no valid checkpoint found (expected step_*.safetensors with manifest)"
            )
        return found
    m = _NAME.match(path.name.split(".", 1)[0])
    if m and path.exists():
        return CkptPaths.of(path.parent, int(m.group(1)))
    raise UserError(
        f"{path}: not an sslctl checkpoint (expected a step_*.safetensors file or a run directory)"
    )


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise UserError(f"{path}: not a readable safetensors file ({_short(e)})") from None


def load_safetensors(
    path: Path, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors under ``prefix`` (stripped) and the metadata; header problems become UserError."""
    try:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if k.startswith(prefix):
                    out[k[len(prefix) :]] = f.get_tensor(k)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({_short(e)})") from None
    return out, meta


def load_train_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: unreadable train state ({_short(e)})") from None


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else e.__class__.__name__)[:200]


def prune(
    directory: Path, keep_last: int, permanent: Callable[[dict[str, Any]], bool]
) -> list[int]:
    """Delete old rolling checkpoints, keeping the newest ``keep_last`` verified ones and every
    checkpoint whose manifest ``permanent`` approves. Never deletes the only verified copy."""
    ckpts = list_checkpoints(directory)
    keep: set[int] = set()
    verified = 0
    for c in reversed(ckpts):
        ok, _ = verify(c)
        if ok and verified < keep_last:
            keep.add(c.step)
            verified += 1
        elif ok and permanent(json.loads(c.manifest.read_text())):
            keep.add(c.step)
    if verified == 0:
        return []
    removed = []
    for c in ckpts:
        if c.step not in keep:
            for f in (c.manifest, c.weights, c.state):  # manifest first: never a verified half
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            removed.append(c.step)
    return removed


def iter_tmp(directory: Path) -> Iterator[Path]:
    return (p for p in directory.glob(".*.tmp"))
