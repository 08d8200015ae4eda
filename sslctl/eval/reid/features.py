"""Re-ID features files (REID.md §5.5): the cache written by eval-reid and its external input.

safetensors with tensors ``features`` (n×d, fp32 or fp16), ``ids`` (int64, −1 junk) and
``cameras`` (int64, −1 unknown); string metadata ``paths`` and ``hashes`` (JSON lists in dataset
order), ``root``, ``layout``, ``flip_fusion``, ``normalized``, ``weights_sha256``, ``transform``,
``precision``, ``features_blake2b`` and the sslctl version. Only the three tensors are required
of a file computed elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import sslctl
from sslctl import UserError, checkpoint
from sslctl.data.text import quote

FORMAT = "sslctl-reid-features"
FORMAT_VERSION = "1"
CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_CHUNK = 1 << 16  # rows per pass for the in-place checks (bounded temporaries)


@dataclass(frozen=True)
class FeatureFile:
    """Features (fp32 after loading), labels and string metadata of one split."""

    features: torch.Tensor
    ids: torch.Tensor
    cams: torch.Tensor
    meta: dict[str, str]
    source: str  # the file (or "extracted") for messages

    @property
    def paths(self) -> list[str]:
        return list(json.loads(self.meta.get("paths", "[]")))

    @property
    def hashes(self) -> list[str]:
        return list(json.loads(self.meta.get("hashes", "[]")))

    def name(self, row: int) -> str:
        """The image path of a row when known, else 'row N'."""
        paths = self.paths
        return paths[row] if row < len(paths) else f"row {row}"


def digest(features: torch.Tensor, ids: torch.Tensor, cams: torch.Tensor) -> str:
    """blake2b-128 of the tensors' bytes: identifies a features set for the rank cache."""
    h = hashlib.blake2b(digest_size=16)
    for t in (features, ids, cams):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        raw = t.contiguous().view(-1).view(torch.uint8)  # any dtype, bf16 included
        for i in range(0, raw.numel(), 1 << 26):
            h.update(raw[i : i + (1 << 26)].numpy().tobytes())
    return h.hexdigest()


def save(path: Path, f: FeatureFile, dtype: str = "fp32") -> None:
    """Atomic write; the digest of the stored tensors goes into the metadata."""
    feats = f.features.to(CACHE_DTYPES[dtype]).contiguous()
    meta = {
        **f.meta,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sslctl_version": sslctl.__version__,
        "dtype": dtype,
        "features_blake2b": digest(feats, f.ids, f.cams),
    }
    checkpoint.save_safetensors(path, {"features": feats, "ids": f.ids, "cameras": f.cams}, meta)


def load(path: Path) -> FeatureFile:
    """Read and validate a features file (shapes, label dtypes, finiteness); fp16 → fp32."""
    if not path.is_file():
        raise UserError(f"features file {path} not found")
    tensors, meta = checkpoint.load_safetensors(path)
    missing = [k for k in ("features", "ids", "cameras") if k not in tensors]
    if missing:
        raise UserError(
            f"{path}: missing tensor(s) {', '.join(missing)} (expected features n×d, ids, cameras)"
        )
    feats, ids, cams = tensors["features"], tensors["ids"], tensors["cameras"]
    if feats.dim() != 2 or not feats.is_floating_point():
        raise UserError(f"{path}: 'features' must be a 2-D float tensor, got {tuple(feats.shape)}")
    n = feats.shape[0]
    for name, t in (("ids", ids), ("cameras", cams)):
        if t.dim() != 1 or len(t) != n or t.is_floating_point():
            raise UserError(
                f"{path}: '{name}' must be {n} integers (one per feature row), "
                f"got shape {tuple(t.shape)} {t.dtype}"
            )
    for key in ("paths", "hashes"):
        _check_string_list(path, meta, key, n)
    if "features_blake2b" not in meta or meta.get("format") != FORMAT:
        meta = {**meta, "features_blake2b": digest(feats, ids, cams)}
    out = FeatureFile(feats.float(), ids.long(), cams.long(), meta, str(path))
    check_finite(out)
    return out


def _check_string_list(path: Path, meta: dict[str, str], key: str, n: int) -> None:
    """Optional metadata ``key`` must be a JSON list of n strings (one per row), else UserError.

    eval-reid treats such a file in OUT/features/ as a stale cache and extracts again; a file
    given with --query-features/--gallery-features is refused with this message."""
    text = meta.get(key)
    if text is None:
        return
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(
            f"{path}: metadata '{key}' is not a JSON list of strings (got '{quote(text, 30)}'); "
            f"write it as a JSON list of {n} strings, one per feature row, or drop the key"
        )
    if len(value) != n:
        raise UserError(
            f"{path}: metadata '{key}' lists {len(value)} entries but the file holds {n} feature "
            f"rows; write one entry per row, or drop the key"
        )


def check_finite(f: FeatureFile) -> None:
    """Non-finite values (e.g. a broken AMP run) are an error naming the file and row."""
    for i in range(0, len(f.features), _CHUNK):
        ok = torch.isfinite(f.features[i : i + _CHUNK]).all(1)
        if not bool(ok.all()):
            row = i + int((~ok).nonzero()[0])
            raise UserError(
                f"{f.source}: non-finite feature value in {f.name(row)} (row {row}); "
                "re-extract the features (with --precision fp32 if AMP overflowed)"
            )


def normalize_(features: torch.Tensor) -> int:
    """L2-normalise rows in place (chunked); returns the number of zero rows (left at 0)."""
    zeros = 0
    for i in range(0, len(features), _CHUNK):
        chunk = features[i : i + _CHUNK]
        zeros += int((chunk.norm(dim=1) == 0).sum())
        chunk.copy_(F.normalize(chunk, dim=1))
    return zeros


def count_zero_rows(features: torch.Tensor) -> int:
    return sum(
        int((features[i : i + _CHUNK].abs().sum(1) == 0).sum())
        for i in range(0, len(features), _CHUNK)
    )


def identical_pairs(query: FeatureFile, gallery: FeatureFile) -> torch.Tensor:
    """(P, 2) int64 (query row, gallery row) pairs of the same file: equal content hash, or the
    same absolute path when no hashes are known (REID.md edge case 3a)."""
    qkeys, gkeys = query.hashes, gallery.hashes
    if not (qkeys and gkeys):
        qkeys, gkeys = _abs_paths(query), _abs_paths(gallery)
    where: dict[str, list[int]] = {}
    for gi, key in enumerate(gkeys):
        where.setdefault(key, []).append(gi)
    pairs = [(qi, gi) for qi, key in enumerate(qkeys) for gi in where.get(key, ())]
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)


def _abs_paths(f: FeatureFile) -> list[str]:
    root = f.meta.get("root", "")
    return [str(Path(root, p)) if root else p for p in f.paths]
