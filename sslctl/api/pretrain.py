"""``sslctl pretrain``: resolve the profile, data and run directory, then run the engine."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sslctl import UserError, checkpoint, config, dist, log
from sslctl.backbones import infer_arch
from sslctl.config import Config
from sslctl.convert.weights import read_backbone
from sslctl.engine.fit import FitRequest, FitResult, fit


@dataclass(frozen=True)
class PretrainResult:
    run_dir: Path
    config: Config
    fit: FitResult


def check_run_dir(out: Path, fresh: bool) -> None:
    """Create the run directory and prove it is writable; --fresh refuses to overwrite a run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"--out {out}: cannot write there ({e.strerror or e}); choose a writable directory"
        ) from None
    if fresh and checkpoint.list_checkpoints(out / "checkpoints"):
        raise UserError(
            f"--out {out} already holds checkpoints and --fresh refuses to overwrite them; "
            "choose another --out or drop --fresh to resume"
        )


def resolve_data(cfg: Config, data: Path | None) -> Path:
    if data is None:
        if cfg.data.root == "bundled":
            from sslctl.data.bundled import bundled_root

            return bundled_root() / "train"
        if not cfg.data.root:
            raise UserError(
                "--data is required: this profile names no data (give --data /path/to/train)"
            )
        data = Path(cfg.data.root)
    if not data.is_dir():
        raise UserError(f"--data {data}: no such directory")
    return data


def build_loader(cfg: Config, root: Path, di: dist.DistInfo) -> object:
    """The data backend for pre-training (torchvision; DALI when selected and available)."""
    from sslctl.data.select import build_pretrain_loader

    return build_pretrain_loader(cfg, root, di)


def read_init_weights(cfg: Config) -> dict[str, torch.Tensor] | None:
    if not cfg.init.weights:
        if cfg.init.required:
            raise UserError(
                "this profile continues from pre-trained backbone weights: give "
                "--set init.weights=PATH (an extracted backbone, checkpoint or torchvision .pth)"
            )
        return None
    w = read_backbone(Path(cfg.init.weights))
    arch, small = infer_arch(w.state)
    if (arch, small) != (cfg.model.arch, cfg.model.small_stem):
        raise UserError(
            f"init.weights {cfg.init.weights}: a {arch} (small_stem={small}) backbone, but the profile "
            f"trains {cfg.model.arch} (small_stem={cfg.model.small_stem})"
        )
    return w.state


def knn_monitor(cfg: Config, di: dist.DistInfo) -> Callable[[nn.Module], dict[str, float]] | None:
    """The eval.knn_every monitor: weighted kNN of the online backbone on a labelled set."""
    e = cfg.eval
    if e.knn_every <= 0:
        return None
    if not e.knn_train or not e.knn_val:
        raise UserError(
            "eval.knn_every needs eval.knn_train and eval.knn_val (labelled folders, or 'bundled')"
        )
    from sslctl.eval.knn import knn_monitor as run_knn

    def monitor(backbone: nn.Module) -> dict[str, float]:
        return run_knn(
            backbone,
            e.knn_train,
            e.knn_val,
            e.knn_k,
            e.knn_temperature,
            di.device,
            batch_size=max(cfg.train.batch_size, 64),
            image_size=cfg.data.image_size,
            workers=cfg.data.workers,
        )

    return monitor


def pretrain(
    profile: str,
    out: Path,
    data: Path | None = None,
    sets: list[str] | None = None,
    resume: str = "auto",
    fresh: bool = False,
    max_steps: int | None = None,
) -> PretrainResult:
    cfg = config.load(profile, sets or [])
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {max_steps}")
    check_run_dir(out, fresh)
    root = resolve_data(cfg, data)
    init = read_init_weights(cfg)
    di = dist.init()
    try:
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        loader = build_loader(cfg, root, di)
        log.info(
            f"pretrain [bold]{cfg.method.name}[/] {cfg.model.arch} on {root} → {out} "
            f"({di.world_size} process(es), {di.device.type}, batch {cfg.train.batch_size}×"
            f"{cfg.train.accumulate}×{di.world_size} = "
            f"{cfg.train.batch_size * cfg.train.accumulate * di.world_size} per step)"
        )
        req = FitRequest(
            cfg, out, loader, "none" if fresh else resume, max_steps, init, knn_monitor(cfg, di)
        )
        result = fit(req, di)
    finally:
        dist.shutdown()
    return PretrainResult(out, cfg, result)
