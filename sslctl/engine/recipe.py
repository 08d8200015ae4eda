"""What a pre-training config builds: the method on its device and the DDP-wrapped module to
train, the optimizer, the lr and target momentum schedules, and a checkpoint's network side:
its metadata, the check that it holds the same network, loading its weights and optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sslctl import UserError, __version__, checkpoint, dist, last_line
from sslctl.config import Config, from_json
from sslctl.engine.lars import LARS, param_groups_lars
from sslctl.engine.schedules import ReferenceLR, TargetMomentum, WarmupCosine
from sslctl.methods import SiameseMethod, build_method


class BufferSafeDDP(DDP):
    """DDP whose forward-time buffer broadcast keeps autograd's version counters.

    Both methods call the online network twice before one backward. DDP re-broadcasts the BN
    running statistics from rank 0 before each forward; before torch 2.12.1 that in-place copy
    bumped the buffers' version counters, and the first forward's saved tensors then failed
    backward ("modified by an inplace operation"). torch ≥ 2.12.1 does exactly this itself.
    """

    def _sync_buffers(self) -> None:
        keep = getattr(torch.autograd, "_unsafe_preserve_version_counter", None)
        if keep is None:
            return super()._sync_buffers()
        with keep(tuple(self.modules_buffers)):
            return super()._sync_buffers()


def build_optimizer(
    cfg: Config, online: nn.Module, fixed_lr: tuple[str, ...] = ()
) -> torch.optim.Optimizer:
    """LARS, SGD or AdamW over the SPEC §1 groups: biases and BN parameters get no weight
    decay (and, under LARS, no trust ratio). Parameters named with a ``fixed_lr`` prefix get
    groups of their own marked ``fixed_lr`` (their lr stays at optim.lr: SimSiam's predictor).
    ``optim.decay_all`` decays the excluded group too (MoCo's and SimSiam's code)."""
    named = list(online.named_parameters())
    fixed = [(n, p) for n, p in named if fixed_lr and n.startswith(fixed_lr)]
    scheduled = [(n, p) for n, p in named if not (fixed_lr and n.startswith(fixed_lr))]
    groups = param_groups_lars(scheduled, cfg.optim.weight_decay)
    groups += [{**g, "fixed_lr": True} for g in param_groups_lars(fixed, cfg.optim.weight_decay)]
    if cfg.optim.decay_all:
        for g in groups:
            g["weight_decay"] = cfg.optim.weight_decay
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=o.lr, betas=(o.momentum, 0.999), weight_decay=o.weight_decay
        )
    if o.name == "lars":
        return LARS(
            groups,
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            trust_coef=o.trust_coef,
        )
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def lr_schedule(cfg: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """The lr at each optimizer step: ``optim.schedule`` reference (the paper code's mmcv
    semantics) or per-step (linear warm-up, then a per-step cosine)."""
    o, t = cfg.optim, cfg.train
    if o.schedule == "reference":
        return ReferenceLR(
            o.lr, t.epochs, steps_per_epoch, t.accumulate, o.warmup_epochs,
            o.warmup_start_factor, o.min_lr,
        )  # fmt: skip
    warm = round(o.warmup_epochs * steps_per_epoch)
    total = t.epochs * steps_per_epoch
    return WarmupCosine(o.lr, total, warm, o.warmup_start_factor, o.final_lr_factor)


def target_momentum(method: SiameseMethod, total_steps: int) -> Callable[[int], float] | None:
    """The target network's momentum at each optimizer step; None when the method has none."""
    if method.target is None:
        return None
    base = method.cfg.method.base_momentum
    if method.target_momentum == "constant":
        return lambda k: base
    return TargetMomentum(base, total_steps)


def check_same_network(cfg: Config, ck: checkpoint.CkptPaths, meta: dict[str, str]) -> None:
    """A run continues only with the network and optimiser it was started with: e.g. a
    ``runs/demo`` left by an older demo profile is refused in one line, not a traceback."""
    if "config" not in meta:
        return
    try:
        was = from_json(meta["config"], str(ck.weights))
    except UserError:
        return  # a config this version cannot read: the tensor check below still guards
    now = cfg
    diffs = [
        f"{key} {a} → {b}"
        for key, a, b in (
            ("model.arch", was.model.arch, now.model.arch),
            ("model.small_stem", was.model.small_stem, now.model.small_stem),
            ("model.proj_dim", was.model.proj_dim, now.model.proj_dim),
            ("method.name", was.method.name, now.method.name),
            ("optim.name", was.optim.name, now.optim.name),
        )
        if a != b
    ]
    if diffs:
        raise UserError(
            f"{ck.weights}: this run was started with other settings ({', '.join(diffs)}); "
            f"resume it with its own profile, or start a new run in another --out (or delete this one)"
        )


def build_model(
    cfg: Config, di: dist.DistInfo, init_backbone: dict[str, torch.Tensor] | None = None
) -> tuple[SiameseMethod, nn.Module]:
    """The method on this process's device (SyncBN, channels-last, cuDNN and TF32 as configured)
    and the module to train: its online network, wrapped in DDP when there are several ranks.
    ``init_backbone``: continue from given backbone weights (SPEC §1 SYSU-30k run), online
    and target alike."""
    method: SiameseMethod = build_method(cfg)
    if init_backbone is not None:
        method.online.encoder.backbone.load_state_dict(init_backbone, strict=True)
        if method.target is not None:
            method.target.backbone.load_state_dict(init_backbone, strict=True)
    method.to(di.device)
    cuda = di.device.type == "cuda"
    if cfg.model.sync_bn and di.world_size > 1 and cuda:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)  # type: ignore[assignment]
    if cuda and cfg.train.precision == "fp32":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls in fp32 training only
    if cuda:
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    if cuda and cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if di.world_size == 1:
        return method, method.online
    online = BufferSafeDDP(
        method.online,
        device_ids=[di.device.index] if cuda else None,
        # SyncBN computes batch statistics over all ranks, so running statistics agree
        # without the forward-time broadcast; plain BN keeps rank 0's, as before.
        broadcast_buffers=not (cfg.model.sync_bn and cuda),
        gradient_as_bucket_view=True,  # no separate gradient copy of every bucket
    )
    return method, online


def checkpoint_meta(cfg: Config, epoch: int, data_root: str) -> dict[str, str]:
    """A pre-training checkpoint's metadata: what network it holds and how it was trained."""
    return {
        "method": cfg.method.name,
        "arch": cfg.model.arch,
        "small_stem": str(cfg.model.small_stem).lower(),
        "config": cfg.to_json(),
        "epoch": str(epoch),
        "sslctl_version": __version__,
        "data_root": data_root,
    }


def load_training_state(
    method: SiameseMethod,
    opt: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    ck: checkpoint.CkptPaths,
    cfg: Config,
    device: torch.device,
) -> None:
    """A checkpoint's network weights (onto ``device``) and optimizer state, refused in one
    line when they are another network's or another optimizer's."""
    try:
        method.load_state_tensors({k: v.to(device) for k, v in tensors.items()})
    except RuntimeError as e:
        raise UserError(
            f"{ck.weights}: its weights do not fit the network this profile builds "
            f"({last_line(e)}); resume it with the profile it was started with, or start "
            f"a new run in another --out (or delete this one)"
        ) from None
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(
            f"{ck.state}: its optimizer state does not fit optim.name={cfg.optim.name} "
            f"({last_line(e)}); resume with the profile the run was started with, or start "
            f"a new run in another --out (or delete this one)"
        ) from None
