"""``sslctl eval-reid``: person re-identification evaluation with cached features and ranks.

Flow: features (from the cache in OUT/features/, or extracted with torchrun sharding, or given
as --query-features/--gallery-features) → positive ranks (cached in OUT/ranks.safetensors,
keyed by both features digests) → CMC / mAP / mINP → results.json, cmc.png. Changing the AP
definition, denominator, tie rule or max rank re-uses both caches and never recomputes scores.
Defaults of the fusion, precision, AP and denominator depend on the layout (``layout_defaults``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import sslctl
from sslctl import UserError, checkpoint, dist, log, rundir
from sslctl.backbones import load_backbone
from sslctl.convert.weights import read_backbone
from sslctl.eval import reid_features as rf
from sslctl.eval import reid_layouts as rl
from sslctl.eval import reid_metrics as rmx
from sslctl.eval.cache import state_digest
from sslctl.eval.features import FUSIONS, extract_features_and_labels, true_fp32
from sslctl.eval.reid_plot import save_cmc_plot

PRECISIONS = ("auto", "bf16", "fp32")
# One switch per family of reference implementations (REID.md "Presets").
COMPAT = {
    "triplet-script": {"ap": "trapezoid", "denominator": "all", "flip_fusion": "legacy-triplet"},
    "torchreid": {"ap": "standard", "denominator": "valid", "flip_fusion": "sum"},
}
# The paper's evaluation (wanggrun/triplet Self-Supervised-ReID/test_sysu_combine.py, which is
# SYSU-30k's own self-supervised script): fp32 features, normalise-first fusion, CMC and mAP
# summed over valid queries but divided by all of them, trapezoid AP.
SYSU30K_REFERENCE = {
    "flip_fusion": "legacy-triplet",
    "precision": "fp32",
    "ap": "trapezoid",
    "denominator": "all",
}
# Every other layout: torchreid / fast-reid choices; "auto" precision is then bf16 on CUDA.
DEFAULTS = {"flip_fusion": "sum", "precision": "auto", "ap": "standard", "denominator": "valid"}
RANKS_FORMAT = "sslctl-reid-ranks/1"


@dataclass(frozen=True)
class EvalReidOptions:
    weights: Path | None = None  # checkpoint, extracted backbone or torchvision .pth
    part: str = "online"
    data: Path | None = None
    query: Path | None = None
    gallery: Path | None = None
    layout: str | None = None
    query_features: Path | None = None
    gallery_features: Path | None = None
    out: Path = Path("runs/reid")
    flip: bool = True
    flip_fusion: str | None = None  # None: from --compat, else the layout's default
    precision: str = "auto"  # the layout's default: sysu30k fp32; else bf16 on CUDA, fp32 on CPU
    batch_size: int = 128
    workers: int | None = None  # None: min(8, CPUs)
    device: str = "auto"
    ap: str | None = None
    denominator: str | None = None
    ties: str = "pessimistic"
    metric: str = "cosine"
    max_rank: int = 50
    mem_budget: int = rmx.DEFAULT_MEM_BUDGET
    junk_identical: bool | None = None  # None: on for imagefolder only
    junk_classes: tuple[str, ...] = ("-1",)
    camera_regex: str | None = None
    cache_dtype: str = "fp32"
    recompute: bool = False
    compat: str | None = None


@dataclass(frozen=True)
class EvalReidResult:
    results: dict[str, Any]  # the content of results.json ({} on ranks other than 0)
    results_path: Path | None
    plot_path: Path | None
    extracted: tuple[str, ...]  # splits whose features were computed in this call
    ranks_cached: bool


def layout_defaults(layout: str | None) -> dict[str, str]:
    """Default fusion, precision, AP and denominator for a layout (flags and --compat win).

    sysu30k reproduces the reference script's numbers; Market-1501 and ImageFolder sets keep
    the choices of torchreid and fast-reid, against which such numbers are usually compared.
    """
    return dict(SYSU30K_REFERENCE if layout == "sysu30k" else DEFAULTS)


def _defaults_layout(o: EvalReidOptions) -> str | None:
    """The layout whose defaults apply: a features file's own, as _features_from_files reads it."""
    path = o.query_features
    if path is not None and path.is_file():  # a missing file is reported when it is loaded
        return checkpoint.read_metadata(path).get("layout") or o.layout
    return o.layout


def _resolve(o: EvalReidOptions) -> EvalReidOptions:
    """Fill defaults (explicit flag, then --compat, then the layout's) and check choices."""
    if o.compat is not None and o.compat not in COMPAT:
        raise UserError(f"--compat must be one of {', '.join(COMPAT)}, got '{o.compat}'")
    preset = COMPAT.get(o.compat or "", {})
    defaults = layout_defaults(_defaults_layout(o))

    def pick(key: str, unset: str | None = None) -> str:
        value = getattr(o, key)
        return str(value if value != unset else preset.get(key, defaults[key]))

    o = replace(
        o,
        ap=pick("ap"),
        denominator=pick("denominator"),
        flip_fusion=pick("flip_fusion"),
        precision=pick("precision", unset="auto"),
    )
    if o.flip_fusion not in FUSIONS:
        raise UserError(f"--flip-fusion must be one of {', '.join(FUSIONS)}, got '{o.flip_fusion}'")
    if o.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{o.precision}'")
    if o.cache_dtype not in rf.CACHE_DTYPES:
        raise UserError(f"--cache-dtype must be one of {', '.join(rf.CACHE_DTYPES)}")
    if o.max_rank < 1 or o.batch_size < 1 or o.mem_budget < 1:
        raise UserError("--max-rank, --batch-size and --mem-budget must be positive")
    if o.metric not in rmx.SCORE_METRICS:
        raise UserError(f"--metric must be one of {', '.join(rmx.SCORE_METRICS)}")
    return o


def _report_labels(layout: str, q: Any, g: Any) -> None:
    lines, warnings = rl.describe(layout, q.ids, q.cams, g.ids, g.cams)
    for line in lines:
        log.info(line)
    for w in warnings:
        log.warn(w)


def _features_from_files(o: EvalReidOptions) -> tuple[rf.FeatureFile, rf.FeatureFile]:
    if o.query_features is None or o.gallery_features is None:
        raise UserError("give both --query-features and --gallery-features")
    if o.weights is not None or o.data is not None or o.query is not None or o.gallery is not None:
        raise UserError(
            "--query-features/--gallery-features replace WEIGHTS and the image folders: "
            "give one or the other"
        )
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
    """Whether the cached file matches; says why not when it exists but differs."""
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


def _load_model(o: EvalReidOptions) -> tuple[torch.nn.Module, str]:
    if o.weights is None:
        raise UserError(
            "give WEIGHTS (a checkpoint, extracted backbone or torchvision .pth), "
            "or --query-features and --gallery-features"
        )
    bw = read_backbone(o.weights, o.part)
    model, arch = load_backbone(bw.state, str(o.weights))
    log.info(f"weights: {o.weights} ({bw.source_kind}, {arch})")
    return model, state_digest(bw.state)


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
    if dist.broadcast_object(_cache_hit(path, want, o.recompute) if main else None):
        log.info(f"{name}: using cached features {path} (no extraction)")
        return (rf.load(path) if main else None), False
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


def _features_from_images(
    o: EvalReidOptions, di: dist.DistInfo
) -> tuple[rf.FeatureFile | None, rf.FeatureFile | None, tuple[str, ...]]:
    """Cached or freshly extracted features of both splits (None on ranks other than 0)."""
    if o.layout is None:
        raise UserError(f"--layout is required to read images ({', '.join(rl.LAYOUTS)})")
    qroot, groot = rl.resolve_roots(o.layout, o.data, o.query, o.gallery)
    splits = rl.scan_layout(
        o.layout, qroot, groot, junk_classes=o.junk_classes, camera_regex=o.camera_regex
    )
    _report_labels(o.layout, *splits)
    model, wsha = _load_model(o)
    precision = o.precision  # "auto" only where the layout's default leaves it to the device
    if precision == "auto":
        precision = "bf16" if di.device.type == "cuda" else "fp32"
    workers = o.workers if o.workers is not None else min(8, os.cpu_count() or 1)
    ex = _Extraction(model, wsha, precision, workers, di.device)
    q, q_new = _split_features(o, ex, "query", splits[0])
    g, g_new = _split_features(o, ex, "gallery", splits[1])
    return q, g, tuple(n for n, new in (("query", q_new), ("gallery", g_new)) if new)


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
    with log.make_progress("ranking") as bar:
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
        "weights_sha256": q.meta.get("weights_sha256", "unknown"),
        "features_hash": {
            "query": q.meta["features_blake2b"],
            "gallery": g.meta["features_blake2b"],
        },
        "features_files": {"query": q.source, "gallery": g.source},
        **extra,
        "sslctl_version": sslctl.__version__,
    }


def _evaluate(
    o: EvalReidOptions, q: rf.FeatureFile, g: rf.FeatureFile, device: torch.device
) -> tuple[dict[str, Any], Path, Path]:
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
    results = _results(o, q, g, m, extra)
    results_path, plot_path = o.out / "results.json", o.out / "cmc.png"
    text = json.dumps(results, indent=2) + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    checkpoint.atomic_write(results_path, write)
    title = f"CMC {layout or 'features'}: {m.num_valid_queries} queries, {m.ap_definition} AP"
    save_cmc_plot(plot_path, results["cmc"], title)
    return results, results_path, plot_path


def eval_reid(opts: EvalReidOptions) -> EvalReidResult:
    """Evaluate re-ID features of a backbone (or given features files); see the module doc."""
    o = _resolve(opts)
    di = dist.init(o.device)
    try:
        with rundir.lock_on_main(o.out, di.is_main):
            return _run(o, di)
    finally:
        dist.shutdown()


def _run(o: EvalReidOptions, di: dist.DistInfo) -> EvalReidResult:
    q: rf.FeatureFile | None
    g: rf.FeatureFile | None
    if o.query_features is not None or o.gallery_features is not None:
        q, g = _features_from_files(o)
        extracted: tuple[str, ...] = ()
    else:
        q, g, extracted = _features_from_images(o, di)
    if not di.is_main or q is None or g is None:
        return EvalReidResult({}, None, None, extracted, False)
    results, results_path, plot_path = _evaluate(o, q, g, di.device)
    return EvalReidResult(
        results, results_path, plot_path, extracted, bool(results["ranks_cached"])
    )
