"""``sslctl pretrain``: resolve the profile, data and run directory, then run the engine."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sslctl import UserError, as_path, config, dist, log, rundir
from sslctl.backbones import infer_arch
from sslctl.config import Config
from sslctl.convert.weights import read_backbone
from sslctl.data.loader import TwoViewLoader
from sslctl.engine.fit import FitRequest, FitResult, fit
from sslctl.engine.preempt import StopFlag
from sslctl.engine.run_state import Diverged

__all__ = ["Diverged", "PretrainResult", "pretrain"]


@dataclass(frozen=True)
class PretrainResult:
    run_dir: Path
    config: Config
    fit: FitResult


def plan_run(
    out: Path, cfg: Config, request: rundir.ResumeRequest, di: dist.DistInfo
) -> rundir.ResumePlan:
    """Rank 0 (holding the run's lock) decides where training starts; every rank gets the same
    plan, or the same one-line refusal (no rank is left waiting for another)."""
    plan: rundir.ResumePlan | None = None
    error = ""
    if di.is_main:
        try:
            plan = rundir.plan_resume(out, request, cfg.to_dict())
        except UserError as e:
            error = str(e)
        except OSError as e:  # moving aside: permissions, a full or read-only disk
            where = f" ({e.filename})" if e.filename else ""
            error = f"--out {out}: {e.strerror or e}{where}; fix the directory, then rerun"
        except Exception as e:  # a bug: told to every rank, then its traceback on rank 0
            dist.broadcast_object((f"rank 0 failed: {type(e).__name__}: {e}", None))
            raise
    error, plan = dist.broadcast_object((error, plan))  # type: ignore[misc]
    if error or plan is None:
        raise UserError(error or "the run directory could not be prepared on rank 0")
    return plan


def recorded_config(cfg: Config, data: Path | None, root: Path) -> Config:
    """The configuration exactly as it will run: ``data.root`` resolved (``bundled`` stays the
    name of the built-in set), and the kNN monitor off when it would score the bundled digits
    while training on the user's --data."""
    bundled = data is None and cfg.data.root == "bundled"
    cfg = cfg.replace(
        data=dataclasses.replace(cfg.data, root="bundled" if bundled else str(root.resolve()))
    )
    e = cfg.eval
    if data is not None and e.knn_every > 0 and "bundled" in (e.knn_train, e.knn_val):
        log.info(
            "kNN monitor off: eval.knn_train/knn_val name the bundled digits, not your --data; "
            "turn it on for your data with --set eval.knn_train=DIR --set eval.knn_val=DIR"
        )
        cfg = cfg.replace(eval=dataclasses.replace(e, knn_every=0))
    return cfg


def resolve_data(cfg: Config, data: Path | None) -> Path:
    if data is None:
        from sslctl.data import bundled

        if cfg.data.root == bundled.SENTINEL:
            return bundled.resolve(cfg.data.root, "train")
        if not cfg.data.root:
            raise UserError(
                "--data is required: this profile names no data (give --data /path/to/train)"
            )
        data = Path(cfg.data.root)
    from sslctl.data.select import data_folder

    return data_folder(data)


def build_loader(cfg: Config, root: Path, di: dist.DistInfo) -> TwoViewLoader:
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
            max_image_pixels=cfg.data.max_image_pixels,
        )

    return monitor


def pretrain(
    profile: str | os.PathLike[str],
    out: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    sets: list[str] | None = None,
    resume: str = "auto",
    fresh: bool = False,
    max_steps: int | None = None,
    rewind: bool = False,
    allow_changes: bool = False,
) -> PretrainResult:
    """Pre-train with ``profile`` (a bundled name or a YAML file) into the run directory ``out``.

    ``data``: the training images (ImageFolder root, or the root of data.list_file; None: the
    profile's data.root); ``sets``: ``"section.key=value"`` overrides, as ``--set``; ``resume``:
    auto (the run's newest verified checkpoint), none, or a checkpoint path; ``fresh``/``rewind``
    move the run's checkpoints aside first (see sslctl.rundir); ``max_steps``: stop (and
    checkpoint) after that many optimizer steps; ``allow_changes``: resume with other settings.
    Raises ``sslctl.UserError`` for a mistake, ``Diverged`` when training diverges.
    """
    out = Path(out)
    data = as_path(data)
    cfg = config.load(os.fspath(profile), sets or [])
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {max_steps}")
    if cfg.log.tensorboard:
        log.require_tensorboard()  # one line now, not after the data scan
    request = rundir.ResumeRequest(resume, fresh, rewind, allow_changes)
    rundir.check_request(request)
    root = resolve_data(cfg, data)
    cfg = recorded_config(cfg, data, root)
    init = read_init_weights(cfg)
    di = dist.init()
    try:
        # a signal during the data scan stops cleanly too; the lock is rank 0's for the run's life
        with StopFlag() as stop, rundir.lock_on_main(out, di.is_main):
            plan = plan_run(out, cfg, request, di)
            req = fit_request(cfg, out, root, plan, max_steps, init, di)
            result = fit(dataclasses.replace(req, stop=stop), di)
    finally:
        dist.shutdown()
    return PretrainResult(out, cfg, result)


def fit_request(
    cfg: Config,
    out: Path,
    root: Path,
    plan: rundir.ResumePlan,
    max_steps: int | None,
    init: dict[str, torch.Tensor] | None,
    di: dist.DistInfo,
) -> FitRequest:
    """Seed, build the data loader (the long part: the scan) and describe the run to fit()."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    loader = build_loader(cfg, root, di)
    log.info(
        f"pretrain {cfg.method.name} {cfg.model.arch} on {root} → {out} "
        f"({di.world_size} process(es), {di.device.type}, batch {cfg.train.batch_size}×"
        f"{cfg.train.accumulate}×{di.world_size} = "
        f"{cfg.train.batch_size * cfg.train.accumulate * di.world_size} per step)"
    )
    return FitRequest(
        cfg,
        out,
        loader,
        str(plan.checkpoint) if plan.checkpoint is not None else "none",
        max_steps,
        init,
        knn_monitor(cfg, di),
        changes=plan.changes,
        data_root=str(root.resolve()),
    )
