"""The fast linear probe on cached features: a proxy for SPEC §3, not the protocol itself.

Features are placed on the accelerator when they fit and standardised per dimension; one
linear head is trained with SGD, warm-up and a per-iteration cosine, scored after every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import log
from sslctl.config import CachedCfg
from sslctl.engine.schedules import WarmupCosine
from sslctl.eval.features import fits_in_free_memory
from sslctl.eval.knn import correct_counts, percent_correct
from sslctl.eval.linear import ProbeResult, make_head


def _standardiser(train_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the training features (std floored: dead units stay 0)."""
    mean = train_feats.mean(dim=0)
    std = train_feats.std(dim=0).clamp_min(1e-6)
    return mean, std


def fits_in_half_free(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` fits in half the accelerator's free memory (False for the CPU)."""
    return fits_in_free_memory(t.numel() * t.element_size(), device, 0.5)


def to_device_if_fits(
    t: torch.Tensor,
    device: torch.device,
    fits: Callable[[torch.Tensor, torch.device], bool] = fits_in_half_free,
) -> torch.Tensor:
    """The whole feature matrix on the accelerator when it fits (``fits``), else where it is."""
    return t.to(device) if fits(t, device) else t


def place_features(
    feats: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    fits: Callable[[torch.Tensor, torch.device], bool] = fits_in_half_free,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features on the accelerator when they fit, and their labels (int64) beside them."""
    feats = to_device_if_fits(feats, device, fits)
    return feats, labels.to(feats.device, torch.int64)


@torch.no_grad()
def _evaluate_head(
    head: nn.Linear,
    feats: torch.Tensor,
    labels: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    chunk: int = 8192,
) -> dict[str, float]:
    dev = head.weight.device
    counts = torch.zeros(2, dtype=torch.float64, device=dev)
    for i in range(0, feats.shape[0], chunk):
        x = (feats[i : i + chunk].to(dev) - stats[0]) / stats[1]
        counts += correct_counts(head(x), labels[i : i + chunk].to(dev))
    return percent_correct(counts, feats.shape[0])


def train_cached_head(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    cfg: CachedCfg,
    device: torch.device,
    seed: int = 0,
    metrics: log.MetricsWriter | None = None,
    desc: str = "cached probe",
) -> ProbeResult:
    """A linear head on cached features (n×d, labels n): the fast proxy, not SPEC §3.

    Features are standardised per dimension with the training set's mean and std (a
    BatchNorm without affine parameters in front of the head, as MAE's linear probe does), so
    one learning rate suits backbones whose feature scales differ by orders of magnitude
    (a random initialisation and a trained one). SGD with momentum, warm-up then a
    per-iteration cosine; top-1/top-5 on the val features after every epoch.
    """
    (tf, ty), (vf, vy) = train, val
    tf, ty = place_features(tf, ty, device)
    stats = tuple(t.to(device) for t in _standardiser(tf))
    head = make_head(tf.shape[1], num_classes, seed).to(device)
    opt = torch.optim.SGD(head.parameters(), cfg.lr, cfg.momentum, weight_decay=cfg.weight_decay)
    spe = math.ceil(tf.shape[0] / cfg.batch_size)
    lr = WarmupCosine(cfg.lr, cfg.epochs * spe, round(cfg.warmup_epochs * spe))
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best, best_epoch, step = -1.0, 0, 0
    with log.make_progress(desc, unit="epoch", plain_every_s=5.0) as bar:
        task = bar.add_task(desc, total=cfg.epochs, stats="")
        for epoch in range(1, cfg.epochs + 1):
            order = torch.randperm(tf.shape[0], generator=g).to(tf.device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i in range(0, tf.shape[0], cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                x = (tf[idx].to(device) - stats[0]) / stats[1]
                loss = F.cross_entropy(head(x), ty[idx].to(device))
                opt.param_groups[0]["lr"] = lr(step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                step += 1
            scores = _evaluate_head(head, vf, vy, stats)  # type: ignore[arg-type]
            if scores["top1"] > best:
                best, best_epoch = scores["top1"], epoch
            rec = {"epoch": float(epoch), **scores, "train_loss": float(loss_sum) / spe}
            history.append(rec)
            if metrics is not None:
                metrics.write({"step": step, **rec, "best_top1": best})
            bar.update(task, advance=1, stats=f"top-1 {scores['top1']:.2f}%")
    last = history[-1]
    return ProbeResult(
        last["top1"], last["top5"], best, best_epoch, cfg.epochs, history, "done", True
    )
