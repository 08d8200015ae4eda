"""Shared wiring of every method: online = backbone + projector (+ predictor), and, for the
methods that have one, a momentum (EMA) target copy of the online encoder.

Each method says what it builds (projector, predictor, target) and how its loss is computed;
the engine trains any of them the same way.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

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
    """backbone → projector; a method's target (momentum) network is a copy of this."""

    def __init__(self, cfg: Config, projector: Callable[[int, int, int], nn.Module] = mlp):
        super().__init__()
        m = cfg.model
        self.backbone = build_backbone(
            m.arch, small_stem=m.small_stem, zero_init_residual=m.zero_init_residual
        )
        self.projector = projector(feature_dim(m.arch), m.proj_hidden, m.proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class Online(nn.Module):
    """The trained part (the only module DDP wraps): encoder + predictor (None: no predictor)."""

    def __init__(self, encoder: Encoder, predictor: nn.Module | None):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction p, projection z), both n×proj_dim; p is z without a predictor."""
        z = self.encoder(x)
        return (z if self.predictor is None else self.predictor(z)), z


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
    if online.predictor is not None:
        online.predictor.apply(small_normal)
    for m in online.modules():
        if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:  # SimSiam: not its last
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SiameseMethod(nn.Module, abc.ABC):
    """online (trained, wrapped by the engine in DDP) + target (EMA, outside DDP and the
    optimizer; None for the methods without one).

    The defaults are BYOL's wiring (SPEC §1): ``mlp`` projector and predictor, a target whose
    momentum follows the cosine schedule from ``method.base_momentum`` to 1. A method changes
    them with the class attributes and ``build_*`` methods below.
    """

    has_target: ClassVar[bool] = True
    # the target's momentum over training: "cosine" (method.base_momentum → 1, BYOL) or
    # "constant" (method.base_momentum throughout, MoCo)
    target_momentum: ClassVar[str] = "cosine"
    # names of online parameters (prefixes) whose lr stays at optim.lr (SimSiam's predictor)
    fixed_lr: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.online = Online(Encoder(cfg, self.build_projector), self.build_predictor(cfg))
        if cfg.model.init == "reference":
            reference_init(self.online)
        self.target: Encoder | None = None
        if self.has_target:
            self.target = copy.deepcopy(self.online.encoder)  # after init: the target copies it
            for p in self.target.parameters():
                p.requires_grad_(False)

    @staticmethod
    def build_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
        return mlp(in_dim, hidden, out_dim)

    def build_predictor(self, cfg: Config) -> nn.Module | None:
        return mlp(cfg.model.proj_dim, cfg.model.pred_hidden, cfg.model.proj_dim)

    @abc.abstractmethod
    def step(self, online: nn.Module, v1: torch.Tensor, v2: torch.Tensor, step: int) -> StepOut:
        """The loss of one micro-step; ``online`` is ``self.online`` or its DDP wrapper."""

    def target_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Target BN layers run in training mode (batch statistics), as in the reference.
        assert self.target is not None
        with torch.no_grad():
            return self.target(x).float()

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """θ_t ← m·θ_t + (1−m)·θ_o over parameters only, in one foreach call (no Python loop)."""
        if self.target is None:
            return
        t: list[torch.Tensor] = [p.data for p in self.target.parameters()]
        o: list[torch.Tensor] = [p.detach() for p in self.online.encoder.parameters()]
        torch._foreach_lerp_(t, o, 1.0 - momentum)  # one pass: t + (1−m)(o − t)

    def _parts(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"online.": self.online.encoder}
        if self.online.predictor is not None:
            parts["predictor."] = self.online.predictor
        if self.target is not None:
            parts["target."] = self.target
        return parts

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint layout: online.backbone.*, online.projector.*, then predictor.* and
        target.* for the methods that have them (the backbone keys are the same for all)."""
        return {
            f"{prefix}{k}": v
            for prefix, module in self._parts().items()
            for k, v in module.state_dict().items()
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        parts = self._parts()
        stray = sorted(k for k in tensors if not k.startswith(tuple(parts)))
        if stray:
            raise RuntimeError(f"unexpected tensors for method {self.cfg.method.name}: {stray[:3]}")
        for prefix, module in parts.items():
            sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            module.load_state_dict(sub, strict=True)


def feature_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised projections: ≈1/√d when healthy, →0 on collapse."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()
