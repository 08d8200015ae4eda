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
from sslctl import UserError, config, dist, files, log
from sslctl.eval import frozen
from sslctl.eval.command import CallerPaths, EvalResult, run_locked
from sslctl.eval.frozen import FrozenBackbone, Matched
from sslctl.eval.protocols import Evaluation, knn_protocol
from sslctl.eval.splits import Splits, resolve_splits
from sslctl.rundir import check_writable


@dataclass(frozen=True)
class KnnEvalOptions(CallerPaths):
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


@dataclass(frozen=True)
class KnnEvalResult(EvalResult):
    """results.json of a kNN evaluation and its path."""


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
    profile = o.profile or frozen.default_profile(o.data)
    cfg = config.load_linear(profile, sets)
    splits = resolve_splits(o.data, o.train, o.val, cfg.data.allow_outside_root)
    if cfg.knn.k > len(splits.train):
        raise UserError(f"--k {cfg.knn.k} exceeds the {len(splits.train)} training images")
    learned = frozen.load_weights(o.weights, o.part, o.trust_pickle)
    matched = frozen.match_training(cfg, o.profile, o.data, tuple(sets), learned)
    check_writable(o.out)
    return run_locked(
        o.out, o.device, lambda di: _evaluate(o, profile, matched, splits, learned, di)
    )


def _evaluate(
    o: KnnEvalOptions,
    profile: str,
    m: Matched,
    splits: Splits,
    learned: FrozenBackbone,
    di: dist.DistInfo,
) -> KnnEvalResult:
    ev = Evaluation(m.cfg, splits, di, frozen.features_dir(o.cache_dir, m.cfg, o.out), o.recompute)
    t0 = time.perf_counter()
    results = {"protocol": "knn", **knn_protocol(ev, learned)}
    if o.compare_random:
        results["random_init"] = knn_protocol(ev, frozen.random_backbone(learned))
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
