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

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import sslctl
from sslctl import UserError, config, dist, files, log
from sslctl.eval import frozen
from sslctl.eval.command import CallerPaths, EvalResult, run_locked
from sslctl.eval.frozen import FrozenBackbone, Matched
from sslctl.eval.linear import probe_settings
from sslctl.eval.protocols import Evaluation, cached_protocol, standard_protocol
from sslctl.eval.splits import Splits, resolve_splits
from sslctl.rundir import check_writable, supersede

PROTOCOLS = ("standard", "cached")


@dataclass(frozen=True)
class LinearEvalOptions(CallerPaths):
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


@dataclass(frozen=True)
class LinearEvalResult(EvalResult):
    stopped: str  # done | signal (a rerun continues)


def _protocol(
    o: LinearEvalOptions, ev: Evaluation, bb: FrozenBackbone, baseline: bool
) -> tuple[dict[str, Any], str]:
    """One protocol run for ``bb`` (``baseline``: the random init, in OUT/random_init/)."""
    run_dir = o.out / "random_init" if baseline else o.out
    suffix = " (random init)" if baseline else ""
    if o.protocol == "standard":
        return standard_protocol(ev, bb, run_dir, f"linear-eval{suffix}")
    return cached_protocol(ev, bb, run_dir, f"cached probe{suffix}"), "done"


def _context(
    o: LinearEvalOptions, profile: str, m: Matched, splits: Splits, bb: FrozenBackbone
) -> dict:
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
    profile = o.profile or frozen.default_profile(o.data)
    cfg = config.load_linear(profile, list(o.sets))
    splits = resolve_splits(o.data, o.train, o.val, cfg.data.allow_outside_root)
    learned = frozen.load_weights(o.weights, o.part, o.trust_pickle)
    matched = frozen.match_training(cfg, o.profile, o.data, o.sets, learned)
    check_writable(o.out)
    return run_locked(
        o.out, o.device, lambda di: _evaluate(o, profile, matched, splits, learned, di)
    )


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
    learned: FrozenBackbone,
    di: dist.DistInfo,
) -> LinearEvalResult:
    if o.fresh:
        if di.is_main:
            start_over(o.out)
        dist.barrier()  # no rank looks for checkpoints while they move
    if di.is_main:
        text = yaml.safe_dump(probe_settings(m.cfg), sort_keys=False)
        files.write_text(o.out / "config.yaml", text)
    log.info(
        f"linear-eval ({o.protocol}) of {learned.arch} on {splits.train_source} "
        f"({len(splits.train)} images) / {splits.val_source} ({len(splits.val)}), "
        f"{splits.num_classes} classes → {o.out} ({di.world_size} process(es), "
        f"{di.device.type})"
    )
    ev = Evaluation(
        m.cfg,
        splits,
        di,
        frozen.features_dir(o.cache_dir, m.cfg, o.out),
        o.recompute,
        o.tensorboard,
    )
    t0 = time.perf_counter()
    results, stopped = _protocol(o, ev, learned, False)
    if stopped == "done" and o.compare_random:
        rnd, stopped = _protocol(o, ev, frozen.random_backbone(learned), True)
        results["random_init"] = rnd
    if not di.is_main or stopped != "done":
        return LinearEvalResult({}, None, stopped)
    results = {**results, **_context(o, profile, m, splits, learned)}
    results["seconds"] = time.perf_counter() - t0
    path = o.out / "results.json"
    files.write_json(path, results)
    return LinearEvalResult(results, path, stopped)
