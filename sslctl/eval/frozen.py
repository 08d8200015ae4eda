"""The frozen backbone that linear-eval and knn-eval evaluate, and its features of the splits.

A ``FrozenBackbone`` is loaded from any weights file ``read_backbone`` accepts, its tensors
hashed at load so that the evaluation can prove it changed nothing (``unchanged``); the
random-init baseline is the same architecture from a fixed seed. Weights that carry their
pre-training config are evaluated at the image size they were trained at unless the user chose
a size (``match_training``). ``split_features`` extracts (or loads from the cache) the
centre-crop features of both splits, at the precision ``feature_precision`` chooses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslctl import dist, log
from sslctl.backbones import build_backbone, infer_arch, load_backbone
from sslctl.config import LinearConfig
from sslctl.convert.weights import read_backbone
from sslctl.data import bundled
from sslctl.data.views import linear_val
from sslctl.eval.cache import cached_features, state_digest
from sslctl.eval.features import auto_precision
from sslctl.eval.splits import Splits

RANDOM_SEED = 0  # the random-init baseline is the same network every time (and cacheable)

Labelled = tuple[torch.Tensor, torch.Tensor]  # (features n×d, labels n)


@dataclass(frozen=True)
class FrozenBackbone:
    """A backbone under evaluation: the network and what results.json says about it."""

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


@dataclass(frozen=True)
class SplitFeatures:
    """Both splits' features on rank 0, and the checks made while extracting them."""

    train: Labelled
    val: Labelled
    from_cache: bool  # both splits came from the features cache
    unchanged: bool  # the backbone's tensors are bit-identical to the loaded ones


def default_profile(data: str | None) -> str:
    """The bundled demo images are 48 px: their profile evaluates at 32 px, not ImageNet's 224."""
    return "linear-demo-cpu" if data == bundled.SENTINEL else "linear-r50"


def load_weights(path: Path, part: str = "online", trust_pickle: bool = False) -> FrozenBackbone:
    w = read_backbone(Path(path), part, trust_pickle)
    net, arch = load_backbone(w.state, str(path))
    small = infer_arch(w.state)[1]
    log.info(f"weights: {path} ({w.source_kind}, {arch}{', small stem' if small else ''})")
    digest = state_digest(net.state_dict())
    return FrozenBackbone(net, arch, small, digest, str(path), _pretrain_config(w.meta))


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
    cfg: LinearConfig,
    profile: str | None,
    data: str | None,
    sets: tuple[str, ...],
    bb: FrozenBackbone,
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


def random_backbone(like: FrozenBackbone, seed: int = RANDOM_SEED) -> FrozenBackbone:
    """The same architecture, randomly initialised (torchvision's init for ResNets, ConvNet4's
    own) from a fixed seed."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = build_backbone(like.arch, small_stem=like.small_stem)
    torch.random.set_rng_state(state)
    return FrozenBackbone(
        net,
        like.arch,
        like.small_stem,
        state_digest(net.state_dict()),
        f"random init (seed {seed})",
    )


def unchanged(bb: FrozenBackbone) -> bool:
    """Whether every weight and BN buffer of ``bb`` still hashes to the digest taken at load."""
    return state_digest(bb.net.state_dict()) == bb.digest


def say_unchanged(bb: FrozenBackbone, same: bool) -> None:
    if same:
        log.info(
            f"backbone check: every weight and BN buffer of {bb.label} is bit-identical to "
            "the loaded one (sha256)"
        )
    else:
        log.warn(f"backbone check FAILED: the tensors of {bb.label} changed during evaluation")


def feature_precision(cfg: LinearConfig, device: torch.device) -> str:
    """Extraction precision: bf16 autocast on GPU unless the profile says fp32; fp32 on CPU."""
    return auto_precision(device, "fp32" if cfg.linear.precision == "fp32" else "auto")


def features_dir(given: Path | None, cfg: LinearConfig, out: Path) -> Path:
    """Where cached features live: --cache-dir, else the profile's cached.cache_dir, else
    OUT/cache."""
    return given or (Path(cfg.cached.cache_dir) if cfg.cached.cache_dir else None) or out / "cache"


def split_features(
    cfg: LinearConfig,
    splits: Splits,
    bb: FrozenBackbone,
    di: dist.DistInfo,
    cache_dir: Path,
    recompute: bool,
) -> SplitFeatures | None:
    """Centre-crop features of both splits (val transform for both), from the cache or
    extracted on every rank; then the backbone check, said on rank 0. None on other ranks."""
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
    same = unchanged(bb)
    if not di.is_main:
        return None
    say_unchanged(bb, same)
    return SplitFeatures((ft, yt), (fv, yv), hit_t and hit_v, same)
