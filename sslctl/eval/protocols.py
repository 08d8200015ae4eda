"""The evaluations of a frozen backbone, each returning its entries of results.json.

``standard_protocol``: SPEC §3's linear probe (``StandardProbe``, resumable in its run
directory). ``cached_protocol``: the fast proxy, a linear head on standardised centre-crop
features extracted once and cached, plus weighted kNN on the same features. ``knn_protocol``:
weighted kNN alone. Under torchrun every rank calls them; only rank 0 gets the entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslctl import dist, log
from sslctl.config import LinearConfig
from sslctl.eval.cached_probe import to_device_if_fits, train_cached_head
from sslctl.eval.frozen import FrozenBackbone, SplitFeatures, say_unchanged, split_features
from sslctl.eval.knn import knn_accuracy
from sslctl.eval.linear import ProbeResult, StandardProbe
from sslctl.eval.splits import Splits

PROXY_NOTE = (
    "fast proxy, not the paper's linear protocol: a linear head on standardised centre-crop features "
    "(val transform for train and val), extracted once and cached"
)


@dataclass(frozen=True)
class Evaluation:
    """What every protocol of one command's run shares: settings, splits, processes, cache."""

    cfg: LinearConfig
    splits: Splits
    di: dist.DistInfo
    cache_dir: Path  # cached features (standard: unused)
    recompute: bool = False  # ignore cached features
    tensorboard: bool = False  # also RUN_DIR/tb/ TensorBoard events


def _features(ev: Evaluation, bb: FrozenBackbone) -> SplitFeatures | None:
    return split_features(ev.cfg, ev.splits, bb, ev.di, ev.cache_dir, ev.recompute)


def _knn(ev: Evaluation, f: SplitFeatures) -> dict[str, float]:
    """Weighted-kNN top1/top5 of the val features against the train features (on the device
    when the bank fits there)."""
    k = ev.cfg.knn
    bank = to_device_if_fits(f.train[0], ev.di.device)
    return knn_accuracy(
        (bank, f.train[1]), f.val, ev.splits.num_classes, k.k, k.temperature, k.chunk
    )


def _probe_summary(r: ProbeResult) -> dict[str, Any]:
    return {
        "top1": r.top1,
        "top5": r.top5,
        "best_top1": r.best_top1,
        "best_epoch": r.best_epoch,
        "epochs": r.epochs,
        "backbone_unchanged": r.backbone_unchanged,
        "history": r.history,
    }


def standard_protocol(
    ev: Evaluation, bb: FrozenBackbone, run_dir: Path, desc: str
) -> tuple[dict[str, Any], str]:
    """SPEC §3's probe in ``run_dir``: (its results.json entries, how it stopped: done|signal)."""
    meta = {"arch": bb.arch, "weights": bb.label}
    probe = StandardProbe(ev.cfg, bb.net, ev.splits, run_dir, ev.di, meta)
    r = probe.run(desc, ev.tensorboard)
    if r.stopped == "done":
        say_unchanged(bb, r.backbone_unchanged)
    return {"protocol": "standard", **_probe_summary(r)}, r.stopped


def cached_protocol(ev: Evaluation, bb: FrozenBackbone, run_dir: Path, desc: str) -> dict[str, Any]:
    """The cached probe and kNN on the same features; metrics in ``run_dir``/metrics.jsonl."""
    f = _features(ev, bb)
    if f is None:
        return {}
    knn = _knn(ev, f)
    tb = run_dir / "tb" if ev.tensorboard else None
    metrics = log.MetricsWriter(run_dir / "metrics.jsonl", tb, first_step=1)
    n, seed = ev.splits.num_classes, ev.cfg.linear.seed
    r = train_cached_head(f.train, f.val, n, ev.cfg.cached, ev.di.device, seed, metrics, desc)
    metrics.close()
    k = ev.cfg.knn
    out = {"protocol": "cached", **_probe_summary(r), "backbone_unchanged": f.unchanged}
    out.update(knn_top1=knn["top1"], knn_top5=knn["top5"], knn_k=k.k, knn_temperature=k.temperature)
    return {**out, "features_from_cache": f.from_cache, "note": PROXY_NOTE}


def knn_protocol(ev: Evaluation, bb: FrozenBackbone) -> dict[str, Any]:
    """Weighted-kNN top1/top5 on the cached features, with the checks made on the way."""
    f = _features(ev, bb)
    if f is None:
        return {}
    top = _knn(ev, f)
    return {**top, "features_from_cache": f.from_cache, "backbone_unchanged": f.unchanged}
