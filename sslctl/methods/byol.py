"""BYOL baseline: the same wiring with BYOL's normalised-MSE loss and no multi-resolution inputs."""

from __future__ import annotations

import torch
from torch import nn

from sslctl.losses.byol import byol_loss
from sslctl.methods.common import SiameseMethod, StepOut, feature_std


class BYOL(SiameseMethod):
    def step(self, online: nn.Module, v1: torch.Tensor, v2: torch.Tensor, step: int) -> StepOut:
        p1, z1 = online(v1)
        p2, _ = online(v2)
        zt1, zt2 = self.target_forward(v1), self.target_forward(v2)
        loss = byol_loss(p1, zt2) + byol_loss(p2, zt1)
        return StepOut(loss, {"feat_std": feature_std(z1)})
