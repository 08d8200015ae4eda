"""``sslctl eval-reid``: person re-identification evaluation with cached features and ranks.

Flow: ``validate`` (every option, the input paths, --out; the layout detected when not given)
→ features (from the cache in OUT/features/, or extracted with torchrun sharding, or given
as --query-features/--gallery-features) → positive ranks (cached in OUT/ranks.safetensors,
keyed by both features digests) → CMC / mAP / mINP → results.json and cmc.png (the latest
run) plus results-<options hash>.json and cmc-<options hash>.png (kept per set of options).
Changing the AP definition, denominator, tie rule or max rank re-uses both caches and never
recomputes scores. Defaults of the fusion, precision, AP and denominator depend on the layout
(``layout_defaults``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

import sslctl
from sslctl import UserError, checkpoint, dist, files, log, paths_as_path, rundir
from sslctl.backbones import load_backbone
from sslctl.convert.weights import PARTS, read_backbone
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
# Options that cannot change the numbers: left out of the hash naming results-<hash>.json, so
# that reruns differing only in these overwrite each other's file instead of piling up.
NOT_HASHED = (
    "out",
    "workers",
    "batch_size",
    "mem_budget",
    "recompute",
    "cmc_log_x",
    "trust_pickle",
    "device",  # the numbers follow the precision (an option, hashed), not the device's name
)


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
    cmc_log_x: bool = False  # logarithmic rank axis in cmc.png
    trust_pickle: bool = False  # allow a .pth that needs full unpickling (runs code in it)

    def __post_init__(self) -> None:
        paths_as_path(self)  # str and os.PathLike paths from Python callers


@dataclass(frozen=True)
class EvalReidResult:
    results: dict[str, Any]  # the content of results.json ({} on ranks other than 0)
    results_path: Path | None  # OUT/results.json: the latest run
    plot_path: Path | None  # OUT/cmc.png
    extracted: tuple[str, ...]  # splits whose features were computed in this call
    ranks_cached: bool
    run_results_path: Path | None = None  # OUT/results-<options hash>.json: this run's options
    run_plot_path: Path | None = None  # OUT/cmc-<options hash>.png


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


def _check_choices(o: EvalReidOptions) -> None:
    """Every option that needs no file: a mistake fails here, before any work is done."""
    for flag, value, known in (
        ("--compat", o.compat, tuple(COMPAT)),
        ("--layout", o.layout, rl.LAYOUTS),
        ("--ap", o.ap, rmx.AP_DEFINITIONS),
        ("--denominator", o.denominator, rmx.DENOMINATORS),
        ("--ties", o.ties, rmx.TIE_RULES),
        ("--metric", o.metric, rmx.SCORE_METRICS),
        ("--precision", o.precision, PRECISIONS),
        ("--flip-fusion", o.flip_fusion, FUSIONS),
        ("--cache-dtype", o.cache_dtype, tuple(rf.CACHE_DTYPES)),
        ("--part", o.part, PARTS),
    ):
        if value is not None and value not in known:
            raise UserError(f"{flag} must be one of {', '.join(known)}, got {str(value)[:40]!r}")
    for flag, number in (
        ("--max-rank", o.max_rank),
        ("--batch-size", o.batch_size),
        ("--mem-budget", o.mem_budget),
    ):
        if number < 1:
            raise UserError(f"{flag} must be a positive number, got {number}")
    if o.workers is not None and o.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {o.workers}")
    if o.camera_regex is not None:
        rl.camera_pattern(o.camera_regex)


def _resolve(o: EvalReidOptions) -> EvalReidOptions:
    """Check choices, then fill defaults (explicit flag, then --compat, then the layout's)."""
    _check_choices(o)
    preset = COMPAT.get(o.compat or "", {})
    defaults = layout_defaults(_defaults_layout(o))

    def pick(key: str, unset: str | None = None) -> str:
        value = getattr(o, key)
        return str(value if value != unset else preset.get(key, defaults[key]))

    return replace(
        o,
        ap=pick("ap"),
        denominator=pick("denominator"),
        flip_fusion=pick("flip_fusion"),
        precision=pick("precision", unset="auto"),
    )


def _check_inputs(o: EvalReidOptions) -> EvalReidOptions:
    """Input paths exist and fit together; the layout is detected when not given (said on the
    console). Returns the options with the layout set."""
    if o.query_features is not None or o.gallery_features is not None:
        if o.query_features is None or o.gallery_features is None:
            raise UserError("give both --query-features and --gallery-features")
        images = (o.weights, o.data, o.query, o.gallery)
        if any(p is not None for p in images):
            raise UserError(
                "--query-features/--gallery-features replace WEIGHTS and the image folders: "
                "give one or the other"
            )
        given = (("--query-features", o.query_features), ("--gallery-features", o.gallery_features))
        for flag, path in given:
            if not path.is_file():
                raise UserError(f"{flag} {path}: no such file (a features .safetensors)")
        return o
    if o.weights is None:
        raise UserError(
            "give WEIGHTS (a checkpoint, extracted backbone or torchvision .pth), "
            "or --query-features and --gallery-features"
        )
    if not o.weights.exists() and not (o.weights.name == "last" and o.weights.parent.is_dir()):
        raise UserError(
            f"WEIGHTS {o.weights}: no such file or directory; give a checkpoint (file, run dir "
            "or …/last), an extracted backbone or a torchvision .pth"
        )
    layout = o.layout
    if layout is None:
        layout, why = rl.detect_layout(o.data, o.query, o.gallery)
        log.info(f"layout: {layout} (detected: {why}; --layout overrides)")
    qroot, groot = rl.resolve_roots(layout, o.data, o.query, o.gallery)
    for what, root in (("query", qroot), ("gallery", groot)):
        if not root.is_dir():
            raise UserError(f"{what} folder {root} does not exist or is not a directory")
    return replace(o, layout=layout)


def _check_out(out: Path) -> None:
    """--out is (or can become) a writable folder; rank 0 only, as only rank 0 writes there."""
    if out.exists() and not out.is_dir():
        raise UserError(
            f"--out {out} is an existing file, not a folder: choose a folder path (it will "
            "hold results.json, cmc.png, features/ and the ranks cache)"
        )
    rundir.check_writable(out)


def validate(opts: EvalReidOptions) -> EvalReidOptions:
    """Every check that needs no weights, features or ranking, as the first thing a run does
    (on SYSU-30k the work behind a late refusal is hours): the options resolved."""
    _check_choices(opts)
    dist.check_device(opts.device)
    o = _resolve(_check_inputs(opts))
    if dist.is_main():
        _check_out(o.out)
    return o


def _report_labels(layout: str, q: Any, g: Any) -> None:
    lines, warnings = rl.describe(layout, q.ids, q.cams, g.ids, g.cams)
    for line in lines:
        log.info(line)
    for w in warnings:
        log.warn(w)


def _features_from_files(o: EvalReidOptions) -> tuple[rf.FeatureFile, rf.FeatureFile]:
    """The given features files (paths checked by _check_inputs)."""
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
    assert o.weights is not None  # checked by _check_inputs
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


def _features_from_images(
    o: EvalReidOptions, di: dist.DistInfo
) -> tuple[rf.FeatureFile | None, rf.FeatureFile | None, tuple[str, ...], dict[str, Any]]:
    """Cached or freshly extracted features of both splits (None on ranks other than 0), the
    splits extracted now, and where they came from (weights, data roots) for results.json."""
    layout = str(o.layout)  # given or detected by _check_inputs
    qroot, groot = rl.resolve_roots(layout, o.data, o.query, o.gallery)
    splits = rl.scan_layout(
        layout, qroot, groot, junk_classes=o.junk_classes, camera_regex=o.camera_regex
    )
    _report_labels(layout, *splits)
    w = _load_model(o)
    precision = o.precision  # "auto" only where the layout's default leaves it to the device
    if precision == "auto":
        precision = "bf16" if di.device.type == "cuda" else "fp32"
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


def options_record(o: EvalReidOptions) -> dict[str, Any]:
    """The resolved options as JSON values (paths absolute, so the record does not depend on
    the directory the command ran in)."""
    record: dict[str, Any] = {}
    for f in fields(o):
        value = getattr(o, f.name)
        if isinstance(value, Path):
            value = os.path.abspath(value)
        elif isinstance(value, tuple):
            value = list(value)
        record[f.name] = value
    return record


def options_hash(record: dict[str, Any]) -> str:
    """First 10 hex digits of the sha256 of the canonical JSON of the options that can change
    the numbers (all but NOT_HASHED): the name of this run's results-<hash>.json."""
    keyed = {k: v for k, v in record.items() if k not in NOT_HASHED}
    canonical = json.dumps(keyed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


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


def _evaluate(
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


@dataclass(frozen=True)
class _Written:
    results: Path
    plot: Path
    run_results: Path
    run_plot: Path


def _write_outputs(o: EvalReidOptions, results: dict[str, Any], m: rmx.ReidMetrics) -> _Written:
    """results.json and cmc.png (the latest run) and results-<hash>.json, cmc-<hash>.png (this
    run's options, kept when a later run uses others), each written atomically."""
    h = results["options_hash"]
    w = _Written(
        o.out / "results.json", o.out / "cmc.png",
        o.out / f"results-{h}.json", o.out / f"cmc-{h}.png",
    )  # fmt: skip
    results["results_files"] = {"latest": w.results.name, "this_run": w.run_results.name}
    for path in (w.run_results, w.results):  # the latest last: it names a file that exists
        files.write_json(path, results)
    layout = results["layout"] or "features"
    label = f"CMC {layout} ({m.num_valid_queries} queries, {m.ap_definition} AP)"
    for path in (w.run_plot, w.plot):
        save_cmc_plot(path, results["cmc"], label, m_ap=results["mAP"], log_x=o.cmc_log_x)
    return w


def eval_reid(weights: str | os.PathLike[str] | None = None, **options: Any) -> EvalReidResult:
    """Evaluate re-ID features of the backbone in ``weights`` (or of given features files); see
    the module doc. ``options``: keyword arguments named as the fields of ``EvalReidOptions``
    (the CLI's flags: ``data``, ``layout``, ``out`` …); paths may be str or PathLike. Every
    option is checked first (``validate``), before weights, features or ranks.

    >>> api.eval_reid("runs/r50", data="/data/Market-1501", out="reid-market")
    """
    return _eval_reid(EvalReidOptions(weights=weights, **options))  # type: ignore[arg-type]


def _eval_reid(opts: EvalReidOptions) -> EvalReidResult:
    o = validate(opts)
    di = dist.init(o.device)
    try:
        with rundir.lock_on_main(o.out, di.is_main):
            return _run(o, di)
    finally:
        dist.shutdown()


def _run(o: EvalReidOptions, di: dist.DistInfo) -> EvalReidResult:
    q: rf.FeatureFile | None
    g: rf.FeatureFile | None
    sources: dict[str, Any] = {}
    if o.query_features is not None or o.gallery_features is not None:
        q, g = _features_from_files(o)
        extracted: tuple[str, ...] = ()
    else:
        q, g, extracted, sources = _features_from_images(o, di)
    if not di.is_main or q is None or g is None:
        return EvalReidResult({}, None, None, extracted, False)
    results, m = _evaluate(o, q, g, di.device, sources)
    w = _write_outputs(o, results, m)
    return EvalReidResult(
        results, w.results, w.plot, extracted, bool(results["ranks_cached"]),
        run_results_path=w.run_results, run_plot_path=w.run_plot,
    )  # fmt: skip
