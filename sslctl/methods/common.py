"""Shared wiring of BYOL-style methods: online = backbone + projector (+ predictor), target = EMA copy."""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslctl.backbones import build_backbone, feature_dim
from sslctl.config import Config


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """SPEC §1: Linear(bias) → BN → ReLU → Linear(bias); no BN on the output."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


class Encoder(nn.Module):
    """backbone → projector; the target network is a copy of this."""

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.backbone = build_backbone(m.arch, small_stem=m.small_stem)
        self.projector = mlp(feature_dim(m.arch), m.proj_hidden, m.proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class Online(nn.Module):
    """The trained part (the only module DDP wraps): encoder + predictor."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.predictor = mlp(cfg.model.proj_dim, cfg.model.pred_hidden, cfg.model.proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction p, projection z), both n×proj_dim."""
        z = self.encoder(x)
        return self.predictor(z), z


@dataclass
class StepOut:
    loss: torch.Tensor  # scalar, differentiable
    stats: dict[
        str, torch.Tensor
    ]  # detached scalars (d_ap, d_an, feat_std, …), synced only at log time


@torch.no_grad()
def reference_init(online: Online) -> None:
    """The paper code's initialisation (OpenSelfSup; SPEC §1): backbone convolutions and projector
    Linear layers kaiming-normal (fan_in, relu), predictor Linear layers N(0, 0.01), every bias 0,
    every BN weight 1 and bias 0 (no zero-init of the residual BN)."""

    def kaiming(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def small_normal(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)

    online.encoder.backbone.apply(kaiming)
    online.encoder.projector.apply(kaiming)
    online.predictor.apply(small_normal)
    for m in online.modules():
        if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SiameseMethod(nn.Module, abc.ABC):
    """online (trained, wrapped by the engine in DDP) + target (EMA, outside DDP and the optimizer)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.online = Online(cfg)
        if cfg.model.init == "reference":
            reference_init(self.online)
        self.target = copy.deepcopy(self.online.encoder)  # after init: the target copies it
        for p in self.target.parameters():
            p.requires_grad_(False)

    @abc.abstractmethod
    def step(self, online: nn.Module, v1: torch.Tensor, v2: torch.Tensor, step: int) -> StepOut:
        """The loss of one micro-step; ``online`` is ``self.online`` or its DDP wrapper."""

    def target_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Target BN layers run in training mode (batch statistics), as in the reference.
        with torch.no_grad():
            return self.target(x).float()

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """θ_t ← m·θ_t + (1−m)·θ_o over parameters only, in one foreach call (no Python loop)."""
        t: list[torch.Tensor] = [p.data for p in self.target.parameters()]
        o: list[torch.Tensor] = [p.detach() for p in self.online.encoder.parameters()]
        torch._foreach_lerp_(t, o, 1.0 - momentum)  # one pass: t + (1−m)(o − t)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint layout: online.backbone.*, online.projector.*, predictor.*, target.*."""
        out: dict[str, torch.Tensor] = {}
        for k, v in self.online.encoder.state_dict().items():
            out[f"online.{k}"] = v
        for k, v in self.online.predictor.state_dict().items():
            out[f"predictor.{k}"] = v
        for k, v in self.target.state_dict().items():
            out[f"target.{k}"] = v
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        groups = {
            "online.": self.online.encoder,
            "predictor.": self.online.predictor,
            "target.": self.target,
        }
        for prefix, module in groups.items():
            sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            module.load_state_dict(sub, strict=True)


def feature_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised projections: ≈1/√d when healthy, →0 on collapse."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()
