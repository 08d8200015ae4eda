"""The eval-reid pipeline: features (cached, extracted or given), positive ranks (cached),
CMC / mAP / mINP, and the content of results.json.

Features of each split are cached in OUT/features/<split>.safetensors with the metadata that
must match for a later run to reuse them (``_wanted_meta``); under torchrun every rank extracts
a shard and rank 0 decides, loads and writes. Positive ranks are cached in
OUT/ranks.safetensors, keyed by both features digests, the score metric and the junk rule, so
that changing the AP definition, denominator, tie rule or max rank never recomputes a score.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import sslctl
from sslctl import UserError, checkpoint, dist, log
from sslctl.backbones import load_backbone
from sslctl.convert.weights import read_backbone
from sslctl.eval.cache import state_digest
from sslctl.eval.features import auto_precision, extract_features_and_labels, true_fp32
from sslctl.eval.reid import features as rf
from sslctl.eval.reid import layouts as rl
from sslctl.eval.reid import metrics as rmx
from sslctl.eval.reid.options import EvalReidOptions, options_hash, options_record

RANKS_FORMAT = "sslctl-reid-ranks/1"


def _report_labels(layout: str, q: Any, g: Any) -> None:
    lines, warnings = rl.describe(layout, q.ids, q.cams, g.ids, g.cams)
    for line in lines:
        log.info(line)
    for w in warnings:
        log.warn(w)


def features_from_files(o: EvalReidOptions) -> tuple[rf.FeatureFile, rf.FeatureFile]:
    """The given features files (paths checked when the options were validated)."""
    assert o.query_features is not None and o.gallery_features is not None
    q, g = rf.load(o.query_features), rf.load(o.gallery_features)
    _report_labels(q.meta.get("layout") or o.layout or "features", q, g)
    return q, g


def _wanted_meta(o: EvalReidOptions, split: rl.ReidSplit, wsha: str, precision: str) -> dict:
    """Metadata a cached features file must carry to stand for this extraction."""
    return {
        "layout": str(o.layout),
        "root": str(split.root.resolve()),
        "paths": json.dumps(list(split.rel)),
        "flip_fusion": str(o.flip_fusion) if o.flip else "none",
        "normalized": "true",
        "weights_sha256": wsha,
        "transform": rl.TRANSFORM_TAG,
        "precision": precision,
        "tf32": "off",  # the forward runs under true_fp32(); older caches may have used TF32
        "dtype": o.cache_dtype,
        "format": rf.FORMAT,
        "format_version": rf.FORMAT_VERSION,
    }


def _cache_hit(path: Path, want: dict, recompute: bool) -> bool:
    """Whether the cached file's metadata matches; says why not when it exists but differs."""
    if recompute or not path.is_file():
        return False
    try:
        meta = checkpoint.read_metadata(path)
    except UserError as e:
        log.warn(f"ignoring the unreadable features cache ({e}); extracting again")
        return False
    differ = [k for k in want if meta.get(k) != want[k]]
    if differ:
        log.info(f"cached {path} differs in {', '.join(differ)}: extracting again")
    return not differ


def _cached_features(path: Path, want: dict, recompute: bool) -> rf.FeatureFile | None:
    """The cache when it stands for this extraction and loads cleanly; a cache that does not
    (rows that do not match its paths, malformed metadata) is stale: said, and recomputed."""
    if not _cache_hit(path, want, recompute):
        return None
    try:
        return rf.load(path)
    except UserError as e:
        log.warn(f"stale features cache, extracting again: {e}")
        return None


@dataclass(frozen=True)
class _Weights:
    model: torch.nn.Module
    state_sha256: str  # of the backbone tensors: the features cache key
    provenance: dict[str, Any]  # path as given, the file read, its sha256 (results.json)


def _load_model(o: EvalReidOptions) -> _Weights:
    assert o.weights is not None  # checked when the options were validated
    bw = read_backbone(o.weights, o.part, o.trust_pickle)
    model, arch = load_backbone(bw.state, str(o.weights))
    log.info(f"weights: {o.weights} ({bw.source_kind}, {arch})")
    source = Path(bw.meta.get("source", str(o.weights)))
    state_sha256 = state_digest(bw.state)
    provenance = {
        "path": str(o.weights),
        "file": str(source.resolve()),
        # rank 0 writes results.json: the others need not read the file a second time
        "sha256": checkpoint.sha256_file(source) if dist.is_main() and source.is_file() else None,
        "kind": bw.source_kind,
        "arch": arch,
        "part": o.part,
        "state_sha256": state_sha256,
    }
    return _Weights(model, state_sha256, provenance)


@dataclass(frozen=True)
class _Extraction:
    model: torch.nn.Module
    weights_sha256: str
    precision: str  # resolved: bf16 | fp32
    workers: int
    device: torch.device


def _split_features(
    o: EvalReidOptions, ex: _Extraction, name: str, split: rl.ReidSplit
) -> tuple[rf.FeatureFile | None, bool]:
    """(features on rank 0 else None, whether they were extracted now) for one split."""
    path = o.out / "features" / f"{name}.safetensors"
    want = _wanted_meta(o, split, ex.weights_sha256, ex.precision)
    main = dist.is_main()
    # Rank 0 decides for everyone: the cache may live on a disk only rank 0 sees.
    cached = _cached_features(path, want, o.recompute) if main else None
    if dist.broadcast_object(cached is not None):
        log.info(f"{name}: using cached features {path} (no extraction)")
        return cached, False
    with true_fp32():  # fp32 means fp32 on any device; bf16 autocast is unaffected
        feats, hashes = extract_features_and_labels(
            ex.model, rl.ReidImages(split.paths), batch_size=o.batch_size, device=ex.device,
            precision=ex.precision, flip=o.flip, fusion=str(o.flip_fusion), normalize=True,
            workers=ex.workers, progress_desc=f"{name} features",
        )  # fmt: skip
    if not main:
        return None, True
    meta = {**want, "hashes": json.dumps(rl.hashes_to_hex(hashes))}
    rf.save(path, rf.FeatureFile(feats, split.ids, split.cams, meta, "extracted"), o.cache_dtype)
    log.info(f"{name}: {len(split)} features cached in {path}")
    return rf.load(path), True  # the stored (possibly fp16) values, exactly as a later run


def features_from_images(
    o: EvalReidOptions, di: dist.DistInfo
) -> tuple[rf.FeatureFile | None, rf.FeatureFile | None, tuple[str, ...], dict[str, Any]]:
    """Cached or freshly extracted features of both splits (None on ranks other than 0), the
    splits extracted now, and where they came from (weights, data roots) for results.json."""
    layout = str(o.layout)  # given, or detected when the options were validated
    qroot, groot = rl.resolve_roots(layout, o.data, o.query, o.gallery)
    splits = rl.scan_layout(
        layout, qroot, groot, junk_classes=o.junk_classes, camera_regex=o.camera_regex
    )
    _report_labels(layout, *splits)
    w = _load_model(o)
    # "auto" only where the layout's default leaves it to the device
    precision = auto_precision(di.device, str(o.precision))
    workers = o.workers if o.workers is not None else min(8, os.cpu_count() or 1)
    ex = _Extraction(w.model, w.state_sha256, precision, workers, di.device)
    q, q_new = _split_features(o, ex, "query", splits[0])
    g, g_new = _split_features(o, ex, "gallery", splits[1])
    provenance = {
        "weights": w.provenance,
        "data": {"query": str(qroot.resolve()), "gallery": str(groot.resolve())},
    }
    extracted = tuple(n for n, new in (("query", q_new), ("gallery", g_new)) if new)
    return q, g, extracted, provenance


def _prepare(o: EvalReidOptions, q: rf.FeatureFile, g: rf.FeatureFile) -> int:
    """Check shapes, L2-normalise for cosine when not already done; the number of zero rows."""
    for f, what in ((q, "query"), (g, "gallery")):
        if len(f.ids) == 0:
            raise UserError(f"{f.source}: the {what} set is empty")
    if q.features.shape[1] != g.features.shape[1]:
        raise UserError(
            f"feature dimensions differ: query {q.source} {tuple(q.features.shape)} vs "
            f"gallery {g.source} {tuple(g.features.shape)}"
        )
    if bool((g.ids == -1).all()):
        raise UserError(f"{g.source}: every gallery image is junk (identity −1)")
    zeros = 0
    for f in (q, g):
        if o.metric == "cosine" and f.meta.get("normalized") != "true":
            zeros += rf.normalize_(f.features)
        else:
            zeros += rf.count_zero_rows(f.features)
    if zeros:
        log.warn(f"{zeros} feature rows are all zero: every score with them is 0")
    return zeros


def _rank_key(q: rf.FeatureFile, g: rf.FeatureFile, metric: str, junk_identical: bool) -> str:
    parts = [RANKS_FORMAT, q.meta["features_blake2b"], g.meta["features_blake2b"], metric]
    return hashlib.sha256(json.dumps([*parts, junk_identical]).encode()).hexdigest()


def _ranks(
    o: EvalReidOptions,
    q: rf.FeatureFile,
    g: rf.FeatureFile,
    identical: torch.Tensor | None,
    device: torch.device,
) -> tuple[rmx.PositiveRanks, dict[str, Any]]:
    """Positive ranks from OUT/ranks.safetensors when its key matches, else computed and saved."""
    path = o.out / "ranks.safetensors"
    key = _rank_key(q, g, o.metric, identical is not None)
    if path.is_file() and not o.recompute and checkpoint.read_metadata(path).get("key") == key:
        log.info(f"using cached ranks {path} (no scoring)")
        tensors, _ = checkpoint.load_safetensors(path)
        return rmx.PositiveRanks.from_tensors(tensors), {"ranks_cached": True}
    n_q, n_g, dim = len(q.ids), len(g.ids), q.features.shape[1]
    block = rmx.block_size(n_q, n_g, o.mem_budget)
    bound = rmx.memory_bound(n_q, n_g, dim, block)
    log.info(
        f"ranking {n_q} × {n_g} ({dim}-d) on {device}: blocks of {block} queries, "
        f"memory bound ≈ {bound / 2**30:.2f} GiB"
    )
    t0 = time.perf_counter()
    query = rmx.LabeledFeatures(q.features, q.ids, q.cams)
    gallery = rmx.LabeledFeatures(g.features.to(device), g.ids, g.cams)
    with log.make_progress("ranking", unit="queries", plain_every_s=10.0) as bar:
        task = bar.add_task("ranking", total=n_q, stats="")
        ranks = rmx.positive_ranks(
            query, gallery, metric=o.metric, block=block, identical=identical,
            on_block=lambda n: bar.update(task, advance=n),
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    checkpoint.save_safetensors(path, ranks.to_tensors(), {"key": key, "format": RANKS_FORMAT})
    info = {
        "ranks_cached": False,
        "ranking_seconds": seconds,
        "block_queries": block,
        "memory_bound_bytes": bound,
        "ranking_device": str(device),
    }
    return ranks, info


def _counts(q: rf.FeatureFile, g: rf.FeatureFile, ranks: rmx.PositiveRanks) -> dict[str, Any]:
    paths = q.paths  # parsed once
    rows = (~ranks.valid).nonzero().flatten().tolist()
    invalid = [paths[i] if i < len(paths) else f"row {i}" for i in rows]
    valid_ids = q.ids[(q.ids != -1) & (q.ids != 0)]
    return {
        "num_invalid_queries": len(invalid),
        "invalid_queries": invalid,
        "num_gallery": len(g.ids),
        "num_gallery_junk": int((g.ids == -1).sum()),
        # gallery images (not junk) whose identity matches no query: SYSU 0000others, Market 0000
        "num_distractors": int(((g.ids >= 0) & ~torch.isin(g.ids, valid_ids)).sum()),
    }


def _results(
    o: EvalReidOptions, q: rf.FeatureFile, g: rf.FeatureFile, m: rmx.ReidMetrics, extra: dict
) -> dict[str, Any]:
    """results.json: headline metrics in percent (full precision), then everything to audit them.

    Every choice is named; those fixed when the features were made come from their metadata
    ("unknown" for a features file that does not say).
    """
    fusion = q.meta.get("flip_fusion", "unknown")
    return {
        "rank1": 100 * m.rank1,
        "rank5": 100 * m.rank5,
        "rank10": 100 * m.rank10,
        "mAP": 100 * m.mAP,
        "mINP": 100 * m.mINP,
        "num_queries": m.num_queries,
        "num_valid_queries": m.num_valid_queries,
        **extra.pop("counts"),
        "num_queries_with_ties": m.num_queries_with_ties,
        "ap_definition": m.ap_definition,
        "denominator": m.denominator,
        "ties": m.ties,
        "protocol": "market1501",  # single query, whole gallery; cuhk03-sgs is not built
        "metric": o.metric,
        "max_rank": o.max_rank,
        "rerank": False,
        "cmc": [100 * v for v in m.cmc],
        "layout": q.meta.get("layout") or o.layout,
        "compat": o.compat,
        "flip": "unknown" if fusion == "unknown" else fusion != "none",
        "flip_fusion": fusion,
        "precision": q.meta.get("precision", "unknown"),
        "tf32": q.meta.get("tf32", "unknown"),
        "score_precision": "fp32, TF32 off",
        "cache_dtype": q.meta.get("dtype", "unknown"),
        "transform": q.meta.get("transform", "unknown"),
        # of the backbone tensors (the features cache key); the file's own: weights.sha256
        "weights_sha256": q.meta.get("weights_sha256", "unknown"),
        "features_hash": {
            "query": q.meta["features_blake2b"],
            "gallery": g.meta["features_blake2b"],
        },
        "features_files": {"query": q.source, "gallery": g.source},
        **extra,
        "sslctl_version": sslctl.__version__,
    }


def _provenance(
    o: EvalReidOptions, q: rf.FeatureFile, g: rf.FeatureFile, sources: dict[str, Any]
) -> dict[str, Any]:
    """What a reader of results.json needs to rerun it: weights (path, file, sha256), data
    roots, the options and their hash. For features files, their recorded roots."""
    record = options_record(o)
    data = sources.get("data") or {"query": q.meta.get("root"), "gallery": g.meta.get("root")}
    return {
        "weights": sources.get("weights"),
        "data": data,
        "options": record,
        "options_hash": options_hash(record),
    }


def evaluate(
    o: EvalReidOptions,
    q: rf.FeatureFile,
    g: rf.FeatureFile,
    device: torch.device,
    sources: dict[str, Any],
) -> tuple[dict[str, Any], rmx.ReidMetrics]:
    zeros = _prepare(o, q, g)
    layout = q.meta.get("layout") or o.layout or ""
    junk_identical = o.junk_identical if o.junk_identical is not None else layout == "imagefolder"
    pairs = rf.identical_pairs(q, g)
    if len(pairs):
        how = "junk (--junk-identical)" if junk_identical else "kept (--no-junk-identical)"
        log.warn(f"{len(pairs)} query/gallery pairs are the same image file: {how}")
    ranks, info = _ranks(o, q, g, pairs if junk_identical else None, device)
    m = rmx.summarize(
        ranks, ap=str(o.ap), denominator=str(o.denominator), ties=o.ties, max_rank=o.max_rank
    )
    counts = _counts(q, g, ranks)
    if counts["num_invalid_queries"]:
        log.warn(
            f"{counts['num_invalid_queries']} of {m.num_queries} queries have no valid gallery "
            "match and are excluded (listed in results.json: invalid_queries)"
        )
    extra = {
        "counts": counts,
        "num_identical_query_gallery_pairs": len(pairs),
        "junk_identical": junk_identical,
        "num_zero_norm_features": zeros,
        **info,
    }
    results = {**_results(o, q, g, m, extra), **_provenance(o, q, g, sources)}
    return results, m
