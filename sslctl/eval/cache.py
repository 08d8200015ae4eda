"""On-disk cache of frozen-backbone features for the cached linear probe and kNN.

A cache entry is ``<cache_dir>/<split>-<key>.safetensors`` holding ``features`` (n×d fp32, dataset
order) and ``labels`` (n int64). The key is the sha256 of everything the features depend on:
the backbone's tensors (not the file they came from, so the same weights in any format agree),
the (path, label) listing of the split, the transform and the forward precision. A second run
with the same inputs loads the file instead of decoding a single image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from sslctl import UserError, checkpoint, dist, log
from sslctl.data.readers import MAX_IMAGE_PIXELS, Sample
from sslctl.data.views import EvalSpec
from sslctl.eval.features import labelled_features
from sslctl.eval.splits import listing_digest

FORMAT = "sslctl-features"
FORMAT_VERSION = "1"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_key(weights_digest: str, samples: list[Sample], spec: EvalSpec, precision: str) -> str:
    parts = {
        "format": f"{FORMAT}/{FORMAT_VERSION}",
        "weights": weights_digest,
        "listing": listing_digest(samples),
        "transform": dataclasses.asdict(spec),
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _load(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        tensors, meta = checkpoint.load_safetensors(path)
    except UserError as e:
        log.warn(f"ignoring an unreadable features cache ({e}); extracting again")
        return None
    if meta.get("key") != key or not {"features", "labels"} <= tensors.keys():
        return None
    return tensors["features"], tensors["labels"]


def cached_features(
    model: nn.Module,
    samples: list[Sample],
    spec: EvalSpec,
    *,
    name: str,
    weights_digest: str,
    cache_dir: Path,
    batch_size: int,
    device: torch.device,
    precision: str,
    workers: int,
    recompute: bool = False,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(features n×d fp32, labels n int64, whether they came from the cache), dataset order,
    on rank 0; other ranks get empty tensors (only rank 0 uses them).

    Under torchrun every rank must call this: rank 0 decides whether the cache holds the entry
    (it may sit on a disk only rank 0 sees) and tells the others; a miss is extracted by all
    ranks (sharded, gathered in dataset order) and written by rank 0.
    """
    key = feature_key(weights_digest, samples, spec, precision)
    path = cache_dir / f"{name}-{key[:20]}.safetensors"
    found = _load(path, key) if dist.is_main() and not recompute and path.is_file() else None
    empty = torch.empty((0, 0)), torch.empty((0,), dtype=torch.int64)
    if dist.broadcast_object(found is not None):
        if found is None:
            return *empty, True
        log.info(f"{name}: features from the cache {path}")
        return found[0], found[1].to(torch.int64), True
    feats, labels = labelled_features(
        model, samples, spec, max_image_pixels, batch_size=batch_size, device=device,
        precision=precision, workers=workers, progress_desc=f"features {name}",
    )  # fmt: skip
    labels = labels.to(torch.int64)
    if dist.is_main():
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "key": key,
            "weights_sha256": weights_digest,
            "split": name,
            "images": str(len(samples)),
            "transform": json.dumps(dataclasses.asdict(spec)),
            "precision": precision,
        }
        try:
            checkpoint.save_safetensors(path, {"features": feats, "labels": labels}, meta)
        except OSError as e:
            log.warn(f"cannot write the features cache {path} ({e.strerror or e}); not cached")
        return feats, labels, False
    return *empty, False
