"""Checkpoints: safetensors weights + a separate train-state file + a manifest written last.

A checkpoint named ``step_00001234`` in ``RUN/checkpoints/`` is three files:
- ``step_00001234.safetensors``: weights (``online.backbone.*``, ``online.projector.*``, then
  ``predictor.*`` and ``target.*`` for the methods that have them, MoCo v2's ``queue`` and
  ``queue_ptr``) with string metadata (format, method, arch, config JSON, step).
- ``step_00001234.state.pt``: optimizer, scaler, step, epoch, data position, RNG (tensors and
  plain containers only, so it loads with ``weights_only=True``).
- ``step_00001234.json``: manifest with the sha256 of both files; written last, so a checkpoint
  without a verifying manifest is incomplete and is ignored.
All three are first written under temporary names the run owns (``.sslctl-tmp.*``, removed at
start-up by the process holding the run's lock), fsynced, read back against the manifest, and only
then renamed into place, manifest last. A step that already has a verified checkpoint is never
rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from sslctl import UserError, files, log

FORMAT = "sslctl-checkpoint"
FORMAT_VERSION = "1"
_NAME = re.compile(r"^step_(\d{8,})$")
_STRIP = ("module.", "_orig_mod.")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` anywhere in the key."""
    out = {}
    for k, v in state.items():
        for p in _STRIP:
            k = k.replace(p, "")
        out[k] = v
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes(path: str, data: bytes) -> None:
    """Every byte sslctl writes into a checkpoint or safetensors file goes through here (one
    open, one write: the serialised bytes are made in memory, so no library writes temporaries
    of its own beside ours: safetensors' ``save_file`` leaves its own temporary file on a kill)."""
    with open(path, "wb") as fh:
        fh.write(data)


def safetensors_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """Serialised safetensors; tensors made contiguous (channels_last models included)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in strip_prefixes(tensors).items()}
    return safetensors_save(flat, metadata=meta)


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Atomic safetensors write."""
    data = safetensors_bytes(tensors, meta)
    files.atomic_write(path, lambda tmp: write_bytes(tmp, data))


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
    """Write one checkpoint (weights, train state, manifest last). Rank 0 only.

    Nothing reaches a checkpoint's own names until both files are on disk under temporary names
    and read back equal to the manifest; a step that already verifies is left as it is.
    """
    paths = CkptPaths.of(directory, step)
    if verify(paths)[0]:
        return paths
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": str(step), **meta}
    w_bytes = safetensors_bytes(tensors, meta)
    buf = io.BytesIO()
    torch.save(train_state, buf)
    s_bytes = buf.getvalue()
    temps: list[Path] = []
    try:
        w_tmp, s_tmp, m_tmp = (
            files.temp_for(p) for p in (paths.weights, paths.state, paths.manifest)
        )
        temps = [w_tmp, s_tmp, m_tmp]
        files.write_synced(lambda t: write_bytes(t, w_bytes), w_tmp)
        files.write_synced(lambda t: write_bytes(t, s_bytes), s_tmp)
        manifest = {
            "format": FORMAT,
            "step": step,
            "epoch": train_state.get("epoch"),
            "position": train_state.get("batch_in_epoch"),
            "files": {  # the sums of the bytes meant, so the read-back catches a bad write
                paths.weights.name: hashlib.sha256(w_bytes).hexdigest(),
                paths.state.name: hashlib.sha256(s_bytes).hexdigest(),
            },
        }
        files.write_synced(lambda t: Path(t).write_text(json.dumps(manifest, indent=1)), m_tmp)
        ok, why = _verify_files(m_tmp, {paths.weights.name: w_tmp, paths.state.name: s_tmp})
        if not ok:
            raise OSError(f"checkpoint step {step} did not read back ({why})")
        os.replace(w_tmp, paths.weights)
        os.replace(s_tmp, paths.state)
        os.replace(m_tmp, paths.manifest)  # last: the checkpoint exists from here on
    finally:
        for t in temps:
            with contextlib.suppress(OSError):
                t.unlink()
    files.fsync_dir(directory)
    return paths


def read_manifest(manifest_path: Path) -> dict[str, Any]:
    """A manifest of the shape ``save`` writes, or ValueError saying what is wrong with it
    (OSError when it cannot be read): valid JSON of another shape is malformed, not a crash."""
    try:
        m = json.loads(manifest_path.read_text())
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(m, dict):
        raise ValueError("not a JSON object")
    files = m.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise ValueError("'files' is not a mapping of file names to sha256 sums")
    for key in ("step", "epoch", "position"):
        v = m.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"'{key}' is not a non-negative integer")
    return m


def _listed(manifest_path: Path) -> dict[str, str]:
    """A manifest's ``files`` mapping (name -> sha256); raises OSError/ValueError."""
    return read_manifest(manifest_path)["files"]


def _first_problem(manifest_path: Path, files: dict[str, Path]) -> tuple[Path | None, str]:
    """(None, "") when the manifest lists each name with the sha256 of its file; else the file
    at fault (the manifest itself, or one of ``files``) and what is wrong with it."""
    try:
        listed = _listed(manifest_path)
    except OSError as e:
        return manifest_path, f"unreadable manifest ({e.strerror or e.__class__.__name__})"
    except ValueError as e:
        return manifest_path, f"malformed manifest ({e})"
    for name, f in files.items():
        if name not in listed:
            return f, "not listed"
        if not f.is_file():
            return f, "missing"
        if sha256_file(f) != listed[name]:
            return f, "sha256 differs"
    return None, ""


_SHORT = {  # the reason in `sslctl checkpoints` and resume's skip lines, by what _first_problem says
    "not listed": "manifest does not list {}",
    "missing": "{} missing",
    "sha256 differs": "{} does not match its sha256 (corrupt or truncated)",
}


def _verify_files(manifest_path: Path, files: dict[str, Path]) -> tuple[bool, str]:
    """(ok, reason): ``manifest_path`` parses and lists each name with the sha256 of its file."""
    bad, why = _first_problem(manifest_path, files)
    if bad is None:
        return True, "ok"
    return False, why if bad == manifest_path else _SHORT[why].format(bad.name)


def verify(paths: CkptPaths) -> tuple[bool, str]:
    """(ok, reason): the manifest exists, parses and both files match their sha256."""
    if not paths.manifest.is_file():
        return False, "no manifest (incomplete write)"
    return _verify_files(
        paths.manifest, {paths.weights.name: paths.weights, paths.state.name: paths.state}
    )


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
        elif ok and permanent(read_manifest(c.manifest)):
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


# ------------------------------------------------------------- explicit paths: integrity, finiteness
_WARNED_NO_MANIFEST: set[Path] = set()


def verify_explicit(weights: Path) -> None:
    """Check a checkpoint file named on the command line against the manifest beside it.

    A run directory resolves through ``newest_valid``, which verifies; a file the user names
    would otherwise be read as it is, even corrupt. Files not named ``step_*`` (torchvision
    .pth, extracted backbones) have no manifest to check and pass silently. Without a manifest
    a checkpoint cannot be checked: one warning per file and process, then it is used.
    """
    m = _NAME.match(weights.name.split(".", 1)[0])
    if m is None or weights.is_dir():
        return
    paths = CkptPaths.of(weights.parent, int(m.group(1)))
    if not paths.manifest.is_file():
        key = weights.resolve()
        if key not in _WARNED_NO_MANIFEST:
            _WARNED_NO_MANIFEST.add(key)
            log.warn(f"{weights}: no manifest beside it; its integrity cannot be checked")
        return
    # A .safetensors copied out without its train state is checked alone.
    files = {f.name: f for f in (paths.weights, paths.state) if f == weights or f.is_file()}
    bad, why = _first_problem(paths.manifest, files)
    name = paths.manifest.name
    if bad is None:
        return
    if bad == paths.manifest:
        raise _unverified(paths, f"{bad}: {why}")
    if why == "missing":
        raise UserError(f"{bad}: no such file")
    if why == "not listed":
        raise _unverified(paths, f"{bad}: its manifest {name} does not list it")
    raise _unverified(
        paths, f"{bad} does not match its manifest {name} ({why}: corrupt or truncated)"
    )


def _unverified(paths: CkptPaths, what: str) -> UserError:
    return UserError(
        f"{what}; pick another checkpoint (`sslctl checkpoints {paths.weights.parent}` lists "
        "which verify)"
    )


def nonfinite_summary(tensors: dict[str, torch.Tensor]) -> str:
    """'' when every floating tensor is finite, else 'N non-finite values (tensor NAME)', NAME
    the first in ``tensors``' own order. One count per tensor, read in a single transfer (no
    per-tensor sync on a GPU)."""
    names = [k for k, v in tensors.items() if v.is_floating_point()]
    if not names:
        return ""
    device = tensors[names[0]].device
    counts = torch.stack(
        [torch.isfinite(tensors[k]).logical_not_().sum().to(device) for k in names]
    ).tolist()
    total = int(sum(counts))
    if not total:
        return ""
    first = next(k for k, n in zip(names, counts, strict=True) if n)
    return f"{total} non-finite values (tensor {first})"


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or ±inf: evaluated, they give chance-level numbers and exit 0."""
    bad = nonfinite_summary(tensors)
    if bad:
        raise UserError(f"{source}: the weights contain {bad}")
