"""``sslctl knn-eval``: weighted kNN (cosine, top-k, exp(sim/T) votes) on cached features.

The features are those of ``linear-eval --protocol cached`` (centre crop, val transform for both
splits, the same cache key), so with a shared ``--cache-dir`` either command re-uses the other's.
Weights that carry their pre-training config are evaluated at its image size unless a
``--profile`` other than the default or ``--set data.image_size`` / ``data.resize`` is given, as
in linear-eval.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sslctl
from sslctl import UserError, config, dist, files, log, paths_as_path
from sslctl.api.linear_eval import (
    Backbone,
    Matched,
    default_profile,
    load_weights,
    match_training,
    random_backbone,
    say_unchanged,
    split_features,
)
from sslctl.eval.cache import state_digest
from sslctl.eval.knn import knn_accuracy
from sslctl.eval.linear import to_device_if_fits
from sslctl.eval.splits import Splits, resolve_splits
from sslctl.rundir import check_writable, lock_on_main


@dataclass(frozen=True)
class KnnEvalOptions:
    weights: Path
    data: str | None = None
    train: Path | None = None
    val: Path | None = None
    k: int | None = None  # None: the profile's knn.k
    temperature: float | None = None
    profile: str | None = None  # None: linear-demo-cpu for --data bundled, else linear-r50
    out: Path = Path("runs/knn")
    sets: tuple[str, ...] = ()
    compare_random: bool = False
    part: str = "online"
    cache_dir: Path | None = None
    recompute: bool = False
    device: str = "auto"
    trust_pickle: bool = False  # allow a .pth that needs full unpickling (runs code in it)

    def __post_init__(self) -> None:
        paths_as_path(self)  # str and os.PathLike paths from Python callers


@dataclass(frozen=True)
class KnnEvalResult:
    results: dict[str, Any]  # the content of results.json ({} on ranks other than 0)
    results_path: Path | None


def _one(
    o: KnnEvalOptions, m: Matched, splits: Splits, bb: Backbone, di: dist.DistInfo
) -> dict[str, Any]:
    cfg = m.cfg
    cache_dir = o.cache_dir or (Path(cfg.cached.cache_dir) if cfg.cached.cache_dir else None)
    where = cache_dir or o.out / "cache"
    train, val, hit = split_features(cfg, splits, bb, di, where, o.recompute)
    unchanged = state_digest(bb.net.state_dict()) == bb.digest
    if not di.is_main:
        return {}
    say_unchanged(bb, unchanged)
    kc = cfg.knn
    bank = to_device_if_fits(train[0], di.device)
    acc = knn_accuracy(
        bank, train[1], val[0], val[1], splits.num_classes, kc.k, kc.temperature, kc.chunk
    )
    return {**acc, "features_from_cache": hit, "backbone_unchanged": unchanged}


def knn_eval(weights: str | os.PathLike[str], **options: Any) -> KnnEvalResult:
    """Weighted kNN top-1/top-5 of ``weights`` on labelled splits (centre-crop features,
    extracted once and cached); writes ``out/results.json``. ``options``: keyword arguments
    named as the fields of ``KnnEvalOptions`` (the CLI's flags: ``data``, ``k``, ``out`` …);
    paths may be str or PathLike.

    >>> api.knn_eval("runs/demo", data="bundled", k=20, out="runs/demo-knn")
    """
    return _knn_eval(KnnEvalOptions(weights=weights, **options))  # type: ignore[arg-type]


def _knn_eval(o: KnnEvalOptions) -> KnnEvalResult:
    dist.check_device(o.device)  # before anything is read, extracted or created
    sets = list(o.sets)
    if o.k is not None:
        sets.append(f"knn.k={o.k}")
    if o.temperature is not None:
        if not math.isfinite(o.temperature):  # else the error would name a --set never given
            raise UserError(f"--temperature: {o.temperature} is not a finite number")
        sets.append(f"knn.temperature={o.temperature}")
    profile = o.profile or default_profile(o.data)
    cfg = config.load_linear(profile, sets)
    splits = resolve_splits(o.data, o.train, o.val, cfg.data.allow_outside_root)
    if cfg.knn.k > len(splits.train):
        raise UserError(f"--k {cfg.knn.k} exceeds the {len(splits.train)} training images")
    learned = load_weights(o.weights, o.part, o.trust_pickle)
    matched = match_training(cfg, o.profile, o.data, tuple(sets), learned)
    check_writable(o.out)
    di = dist.init(o.device)
    try:
        with lock_on_main(o.out, di.is_main):
            return _evaluate(o, profile, matched, splits, learned, di)
    finally:
        dist.shutdown()


def _evaluate(
    o: KnnEvalOptions,
    profile: str,
    m: Matched,
    splits: Splits,
    learned: Backbone,
    di: dist.DistInfo,
) -> KnnEvalResult:
    t0 = time.perf_counter()
    results = {"protocol": "knn", **_one(o, m, splits, learned, di)}
    if o.compare_random:
        results["random_init"] = _one(o, m, splits, random_backbone(learned), di)
    if not di.is_main:
        return KnnEvalResult({}, None)
    cfg = m.cfg
    if m.taken:
        results["from_training_config"] = m.taken
    results.update(
        k=cfg.knn.k,
        temperature=cfg.knn.temperature,
        weights=str(o.weights),
        weights_sha256=learned.digest,
        arch=learned.arch,
        num_classes=splits.num_classes,
        train=splits.train_source,
        val=splits.val_source,
        train_images=len(splits.train),
        val_images=len(splits.val),
        profile=profile,
        image_size=cfg.data.image_size,
        resize=cfg.data.resize,
        world_size=di.world_size,
        seconds=time.perf_counter() - t0,
        sslctl_version=sslctl.__version__,
    )
    log.info(f"kNN k={cfg.knn.k} T={cfg.knn.temperature}: top-1 {results['top1']:.2f}%")
    path = o.out / "results.json"
    files.write_json(path, results)
    return KnnEvalResult(results, path)
