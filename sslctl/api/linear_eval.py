"""``sslctl linear-eval``: the SPEC §3 protocol, or the fast probe on cached features.

Flow: profile (kind linear-eval) → labelled splits (checked) → backbone (any weights file
read_backbone accepts; its tensors hashed at load) → torchrun/one process →
- ``standard``: StandardProbe in OUT (checkpoints/, metrics.jsonl; a rerun resumes);
- ``cached``: centre-crop features of train and val (val transform for both) extracted once and
  cached (OUT/cache or --cache-dir, keyed by weights + listing + transform + precision), then a
  linear head on the standardised features and weighted kNN on the same features;
→ the backbone's tensors hashed again (must be bit-identical) → OUT/results.json.
``compare_random`` repeats everything for a seeded random initialisation of the same
architecture (standard: in OUT/random_init/) and stores it under ``random_init``.
Weights that carry their pre-training config (sslctl runs and checkpoints) are evaluated at the
image size they were trained at, unless a ``--profile`` other than the default or
``--set data.image_size`` / ``data.resize`` is given (``match_training``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import sslctl
from sslctl import UserError, config, dist, files, log, paths_as_path
from sslctl.backbones import build_backbone, infer_arch, load_backbone
from sslctl.config import LinearConfig
from sslctl.convert.weights import read_backbone
from sslctl.data.views import linear_val
from sslctl.eval.cache import cached_features, state_digest
from sslctl.eval.knn import knn_accuracy
from sslctl.eval.linear import (
    ProbeResult,
    StandardProbe,
    probe_settings,
    to_device_if_fits,
    train_cached_head,
)
from sslctl.eval.splits import Splits, resolve_splits
from sslctl.rundir import check_writable, lock_on_main, supersede

PROTOCOLS = ("standard", "cached")
RANDOM_SEED = 0  # the random-init baseline is the same network every time (and cacheable)
PROXY_NOTE = (
    "fast proxy, not the paper's linear protocol: a linear head on standardised centre-crop features "
    "(val transform for train and val), extracted once and cached"
)


@dataclass(frozen=True)
class LinearEvalOptions:
    weights: Path
    data: str | None = None  # ROOT with train/ and val/, or "bundled"
    train: Path | None = None  # folder or list file (instead of ROOT/train)
    val: Path | None = None
    profile: str | None = None  # None: linear-demo-cpu for --data bundled, else linear-r50
    out: Path = Path("runs/linear")
    protocol: str = "standard"  # standard | cached
    sets: tuple[str, ...] = ()
    compare_random: bool = False
    part: str = "online"  # online | target backbone of an sslctl checkpoint
    fresh: bool = False  # start over: a run found in out moves to OUT/superseded/<time>/ first
    cache_dir: Path | None = None  # cached features (default: cached.cache_dir or OUT/cache)
    recompute: bool = False  # ignore cached features
    device: str = "auto"
    trust_pickle: bool = False  # allow a .pth that needs full unpickling (runs code in it)
    tensorboard: bool = False  # also OUT/tb/ (and OUT/random_init/tb/) TensorBoard events

    def __post_init__(self) -> None:
        paths_as_path(self)  # str and os.PathLike paths from Python callers


@dataclass(frozen=True)
class LinearEvalResult:
    results: dict[str, Any]  # the content of results.json ({} on ranks other than 0)
    results_path: Path | None
    stopped: str  # done | signal (a rerun continues)


@dataclass(frozen=True)
class Backbone:
    net: nn.Module
    arch: str
    small_stem: bool
    digest: str  # state_digest at load
    label: str  # what the user gave, or "random init (seed 0)"
    trained: dict[str, Any] | None = None  # the pre-training config the weights carry, if any


@dataclass(frozen=True)
class Matched:
    """The evaluation settings once fitted to the weights' pre-training (``match_training``)."""

    cfg: LinearConfig
    taken: dict[str, Any] = field(default_factory=dict)  # what was taken from it (results.json)


def default_profile(data: str | None) -> str:
    """The bundled demo images are 48 px: their profile evaluates at 32 px, not ImageNet's 224."""
    return "linear-demo-cpu" if data == "bundled" else "linear-r50"


def load_weights(path: Path, part: str = "online", trust_pickle: bool = False) -> Backbone:
    w = read_backbone(Path(path), part, trust_pickle)
    net, arch = load_backbone(w.state, str(path))
    small = infer_arch(w.state)[1]
    log.info(f"weights: {path} ({w.source_kind}, {arch}{', small stem' if small else ''})")
    digest = state_digest(net.state_dict())
    return Backbone(net, arch, small, digest, str(path), _pretrain_config(w.meta))


def _pretrain_config(meta: dict[str, str]) -> dict[str, Any] | None:
    """The config JSON an sslctl checkpoint stores in its metadata (None: none, or unreadable)."""
    try:
        cfg = json.loads(meta.get("config", ""))
    except ValueError:
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("kind", "pretrain") == "pretrain" else None


def _trained_with(trained: dict[str, Any] | None) -> int | None:
    """The data.image_size of a pre-training config (None: absent or not a usable size)."""
    data = trained.get("data") if trained else None
    if not isinstance(data, dict):
        return None
    size = data.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        return None
    return size


def match_training(
    cfg: LinearConfig, profile: str | None, data: str | None, sets: tuple[str, ...], bb: Backbone
) -> Matched:
    """Evaluate at the image size ``bb`` was pre-trained at, when its weights carry their config
    and the user chose no size (neither a ``profile`` other than the default one nor ``--set
    data.image_size``/``data.resize``). The profile's resize ratio is kept (224 → 256 becomes
    32 → 37)."""
    size = _trained_with(bb.trained)
    given = {s.split("=", 1)[0].strip() for s in sets}
    chosen = profile is not None and profile != default_profile(data)
    d, taken = cfg.data, dict[str, Any]()
    if size is not None and not (chosen or given & {"data.image_size", "data.resize"}):
        resize = max(size, round(size * d.resize / d.image_size))
        cfg = replace(cfg, data=replace(d, image_size=size, resize=resize))
        taken = {"data.image_size": size, "data.resize": resize}
    elif size is not None and size != d.image_size:
        why = f"profile {profile}" if chosen else "--set"
        said = f"{bb.label} was trained at {size} px; evaluating at {d.image_size} px as the {why} says"
        log.info(said)
    if taken:
        log.info(f"evaluating at {size} px, the size {bb.label} was trained at (from its config)")
    return Matched(cfg, taken)


def random_backbone(like: Backbone, seed: int = RANDOM_SEED) -> Backbone:
    """The same architecture, randomly initialised (torchvision's init for ResNets, ConvNet4's
    own) from a fixed seed."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = build_backbone(like.arch, small_stem=like.small_stem)
    torch.random.set_rng_state(state)
    return Backbone(
        net,
        like.arch,
        like.small_stem,
        state_digest(net.state_dict()),
        f"random init (seed {seed})",
    )


def feature_precision(cfg: LinearConfig, device: torch.device) -> str:
    """Extraction precision: bf16 autocast on GPU unless the profile says fp32; fp32 on CPU."""
    return "bf16" if device.type == "cuda" and cfg.linear.precision != "fp32" else "fp32"


def split_features(
    cfg: LinearConfig,
    splits: Splits,
    bb: Backbone,
    di: dist.DistInfo,
    cache_dir: Path,
    recompute: bool,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], bool]:
    """((train feats, labels), (val feats, labels), both from the cache) — rank 0 holds them."""
    spec = linear_val(cfg.data.image_size, cfg.data.resize)
    common: dict[str, Any] = dict(
        weights_digest=bb.digest,
        cache_dir=cache_dir,
        batch_size=cfg.data.eval_batch_size,
        device=di.device,
        precision=feature_precision(cfg, di.device),
        workers=cfg.data.workers,
        recompute=recompute,
        max_image_pixels=cfg.data.max_image_pixels,
    )
    ft, yt, hit_t = cached_features(bb.net, splits.train, spec, name="train", **common)
    fv, yv, hit_v = cached_features(bb.net, splits.val, spec, name="val", **common)
    return (ft, yt), (fv, yv), hit_t and hit_v


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


def say_unchanged(bb: Backbone, unchanged: bool) -> None:
    if unchanged:
        log.info(
            f"backbone check: every weight and BN buffer of {bb.label} is bit-identical to "
            "the loaded one (sha256)"
        )
    else:
        log.warn(f"backbone check FAILED: the tensors of {bb.label} changed during evaluation")


def _standard(
    o: LinearEvalOptions,
    m: Matched,
    splits: Splits,
    bb: Backbone,
    di: dist.DistInfo,
    baseline: bool,
) -> tuple[dict[str, Any], str]:
    run_dir = o.out / "random_init" if baseline else o.out
    meta = {"arch": bb.arch, "weights": bb.label}
    probe = StandardProbe(m.cfg, bb.net, splits, run_dir, di, meta)
    r = probe.run("linear-eval (random init)" if baseline else "linear-eval", o.tensorboard)
    if r.stopped == "done":
        say_unchanged(bb, r.backbone_unchanged)
    return {"protocol": "standard", **_probe_summary(r)}, r.stopped


def _cached(
    o: LinearEvalOptions,
    m: Matched,
    splits: Splits,
    bb: Backbone,
    di: dist.DistInfo,
    baseline: bool,
) -> tuple[dict[str, Any], str]:
    cfg = m.cfg
    cache_dir = o.cache_dir or (Path(cfg.cached.cache_dir) if cfg.cached.cache_dir else None)
    where = cache_dir or o.out / "cache"
    train, val, hit = split_features(cfg, splits, bb, di, where, o.recompute)
    unchanged = state_digest(bb.net.state_dict()) == bb.digest
    if not di.is_main:
        return {}, "done"
    say_unchanged(bb, unchanged)
    k = cfg.knn
    bank = to_device_if_fits(train[0], di.device)
    knn = knn_accuracy(
        bank, train[1], val[0], val[1], splits.num_classes, k.k, k.temperature, k.chunk
    )
    del bank
    run_dir = o.out / "random_init" if baseline else o.out
    tb = run_dir / "tb" if o.tensorboard else None
    metrics = log.MetricsWriter(run_dir / "metrics.jsonl", tb, first_step=1)
    desc = "cached probe (random init)" if baseline else "cached probe"
    n, seed = splits.num_classes, cfg.linear.seed
    r = train_cached_head(train, val, n, cfg.cached, di.device, seed, metrics, desc)
    metrics.close()
    out = {"protocol": "cached", **_probe_summary(r), "backbone_unchanged": unchanged}
    out.update(knn_top1=knn["top1"], knn_top5=knn["top5"], knn_k=k.k, knn_temperature=k.temperature)
    return {**out, "features_from_cache": hit, "note": PROXY_NOTE}, "done"


def _context(o: LinearEvalOptions, profile: str, m: Matched, splits: Splits, bb: Backbone) -> dict:
    taken = {"from_training_config": m.taken} if m.taken else {}
    return {
        "weights": str(o.weights),
        "weights_sha256": bb.digest,
        "arch": bb.arch,
        "small_stem": bb.small_stem,
        "num_classes": splits.num_classes,
        "train": splits.train_source,
        "val": splits.val_source,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "profile": profile,
        "config": probe_settings(m.cfg),
        **taken,
        "world_size": dist.world_size(),
        "sslctl_version": sslctl.__version__,
    }


def linear_eval(weights: str | os.PathLike[str], **options: Any) -> LinearEvalResult:
    """Evaluate the backbone in ``weights`` with a linear head (see the module doc); writes
    ``out/results.json``. ``options``: keyword arguments named as the fields of
    ``LinearEvalOptions`` (the CLI's flags: ``data``, ``protocol``, ``out`` …); paths may be str
    or PathLike.

    >>> api.linear_eval("runs/demo", data="bundled", protocol="cached", out="runs/demo-eval")
    """
    return _linear_eval(LinearEvalOptions(weights=weights, **options))  # type: ignore[arg-type]


def _linear_eval(o: LinearEvalOptions) -> LinearEvalResult:
    if o.protocol not in PROTOCOLS:
        raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got '{o.protocol}'")
    dist.check_device(o.device)  # before anything is read, extracted or created
    if o.tensorboard:
        log.require_tensorboard()
    profile = o.profile or default_profile(o.data)
    cfg = config.load_linear(profile, list(o.sets))
    splits = resolve_splits(o.data, o.train, o.val, cfg.data.allow_outside_root)
    learned = load_weights(o.weights, o.part, o.trust_pickle)
    matched = match_training(cfg, o.profile, o.data, o.sets, learned)
    check_writable(o.out)
    di = dist.init(o.device)
    try:
        with lock_on_main(o.out, di.is_main):
            return _evaluate(o, profile, matched, splits, learned, di)
    finally:
        dist.shutdown()


def start_over(out: Path) -> None:
    """--fresh: the previous run in ``out`` (checkpoints, metrics, config, results, the random-init
    baseline's run) moves to ``OUT/superseded/<time>/``; nothing is deleted. Rank 0, lock held."""
    dest = supersede(out)
    extra = [out / n for n in ("results.json", "random_init") if (out / n).exists()]
    if dest is None or not extra:
        return
    for p in extra:
        p.replace(dest / p.name)  # a rename within OUT
    log.info(f"moved the previous {', '.join(p.name for p in extra)} there too")


def _evaluate(
    o: LinearEvalOptions,
    profile: str,
    m: Matched,
    splits: Splits,
    learned: Backbone,
    di: dist.DistInfo,
) -> LinearEvalResult:
    if o.fresh:
        if di.is_main:
            start_over(o.out)
        dist.barrier()  # no rank looks for checkpoints while they move
    if di.is_main:
        text = yaml.safe_dump(probe_settings(m.cfg), sort_keys=False)
        files.atomic_write(o.out / "config.yaml", lambda t: Path(t).write_text(text))
    log.info(
        f"linear-eval ({o.protocol}) of {learned.arch} on {splits.train_source} "
        f"({len(splits.train)} images) / {splits.val_source} ({len(splits.val)}), "
        f"{splits.num_classes} classes → {o.out} ({di.world_size} process(es), "
        f"{di.device.type})"
    )
    run = _standard if o.protocol == "standard" else _cached
    t0 = time.perf_counter()
    results, stopped = run(o, m, splits, learned, di, False)
    if stopped == "done" and o.compare_random:
        rnd, stopped = run(o, m, splits, random_backbone(learned), di, True)
        results["random_init"] = rnd
    if not di.is_main or stopped != "done":
        return LinearEvalResult({}, None, stopped)
    results = {**results, **_context(o, profile, m, splits, learned)}
    results["seconds"] = time.perf_counter() - t0
    path = o.out / "results.json"
    files.write_json(path, results)
    return LinearEvalResult(results, path, stopped)
