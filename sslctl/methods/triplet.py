"""Triplet (SPEC §1): BYOL wiring + truncated triplet loss + multi-resolution online/target inputs."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import dist
from sslctl.config import Config
from sslctl.losses.triplet import truncated_triplet_loss
from sslctl.methods.common import SiameseMethod, StepOut, feature_std


class Sizes(NamedTuple):
    """Input sides of one micro-step: each view's online and target forward has its own."""

    online1: int
    online2: int
    target1: int
    target2: int


def multires_sizes(cfg: Config, step: int) -> Sizes:
    """Four independent uniform integer sides for this micro-step, as the reference draws them
    (online view 1, online view 2 in [online_res_min, online_res_max]; then target view 2,
    target view 1 in [target_res_min, target_res_max]).

    Seeded by (seed, step) so that every rank and a resumed run draw the same sizes.
    """
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    m = cfg.method

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    o1, o2 = draw(m.online_res_min, m.online_res_max), draw(m.online_res_min, m.online_res_max)
    t2, t1 = draw(m.target_res_min, m.target_res_max), draw(m.target_res_min, m.target_res_max)
    return Sizes(o1, o2, t1, t2)


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


class Triplet(SiameseMethod):
    def step(self, online: nn.Module, v1: torch.Tensor, v2: torch.Tensor, step: int) -> StepOut:
        c = self.cfg
        if c.method.multires:
            s = multires_sizes(c, step)
            o1, o2 = resize(v1, s.online1), resize(v2, s.online2)
            t1, t2 = resize(v1, s.target1), resize(v2, s.target2)
        else:
            o1, o2, t1, t2 = v1, v2, v1, v2
        p1, z1 = online(o1)
        p2, _ = online(o2)
        zt1, zt2 = self.target_forward(t1), self.target_forward(t2)
        n = p1.shape[0]
        pos = None
        if c.loss.gather_negatives and dist.world_size() > 1:
            # Explicit option (not the reference): negatives from every rank's micro-batch.
            # drop_last makes every rank's micro-batch the same size n, so rank r's rows start at r·n.
            zt1, zt2 = dist.gather_equal(zt1), dist.gather_equal(zt2)
            pos = torch.arange(n, device=p1.device) + dist.rank() * n
        loss = functools.partial(
            truncated_triplet_loss,
            gamma=c.loss.gamma,
            margin=c.loss.margin,
            drop=c.loss.drop_nearest,
            keep=c.loss.keep,
        )
        a, b = loss(p1, zt2, pos), loss(p2, zt1, pos)
        stats = {
            "d_ap": (a.d_ap + b.d_ap) / 2,
            "d_an": (a.d_an + b.d_an) / 2,
            "feat_std": feature_std(z1),
        }
        return StepOut(a.loss + b.loss, stats)
