"""SimSiam (Chen & He, CVPR 2021): a predictor, a stop-gradient, and no momentum network.

Projector: three Linear → BN blocks with ReLU between (BN on the output too, without affine
parameters); predictor: a bottleneck Linear → BN → ReLU → Linear (2048-512-2048 on a
ResNet-50). Loss: the symmetrised negative cosine, halved. The predictor's learning rate is not
decayed (SimSiam's ``--fix-pred-lr``): it stays at ``optim.lr`` while the rest follows the
schedule.
"""

from __future__ import annotations

import torch
from torch import nn

from sslctl.config import Config
from sslctl.losses import negative_cosine
from sslctl.methods.common import SiameseMethod, StepOut, feature_std


def simsiam_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """(Linear → BN → ReLU) × 2 → Linear → BN(affine=False); no Linear bias before a BN."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim, bias=False),
        nn.BatchNorm1d(out_dim, affine=False),
    )


def simsiam_predictor(dim: int, bottleneck: int) -> nn.Sequential:
    """Linear → BN → ReLU → Linear(bias): ``dim`` → ``bottleneck`` → ``dim``."""
    return nn.Sequential(
        nn.Linear(dim, bottleneck, bias=False),
        nn.BatchNorm1d(bottleneck),
        nn.ReLU(inplace=True),
        nn.Linear(bottleneck, dim),
    )


class SimSiam(SiameseMethod):
    has_target = False
    fixed_lr = ("predictor.",)

    @staticmethod
    def build_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
        return simsiam_projector(in_dim, hidden, out_dim)

    def build_predictor(self, cfg: Config) -> nn.Module:
        return simsiam_predictor(cfg.model.proj_dim, cfg.model.pred_hidden)

    def step(self, online: nn.Module, v1: torch.Tensor, v2: torch.Tensor, step: int) -> StepOut:
        p1, z1 = online(v1)
        p2, z2 = online(v2)
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
        return StepOut(loss, {"feat_std": feature_std(z1)})
