"""SimCLR (Chen et al., ICML 2020): one encoder, NT-Xent over the 2N views of a micro-batch.

No predictor and no momentum network. Projector Linear → BN → ReLU → Linear (2048-2048-128 on
a ResNet-50). With ``loss.gather_negatives`` the negatives come from every process's
micro-batch, gathered with gradient (SimCLR's large-batch setting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import dist
from sslctl.config import Config
from sslctl.losses import nt_xent
from sslctl.methods.common import SiameseMethod, StepOut, feature_std


class SimCLR(SiameseMethod):
    has_target = False

    def build_predictor(self, cfg: Config) -> nn.Module | None:
        return None

    def step(self, online: nn.Module, v1: torch.Tensor, v2: torch.Tensor, step: int) -> StepOut:
        # one forward of the 2N views, as SimCLR encodes them: BN statistics over both views
        _, z = online(torch.cat([v1, v2]))
        z1, z2 = z.chunk(2)
        c = self.cfg.loss
        gather = c.gather_negatives and dist.world_size() > 1
        loss = nt_xent(
            z1,
            z2,
            c.temperature,
            gather=dist.gather_with_grad if gather else None,
            rank=dist.rank() if gather else 0,
        )
        with torch.no_grad():
            pos = F.cosine_similarity(z1.float(), z2.float(), dim=1).mean()
        return StepOut(loss, {"feat_std": feature_std(z1), "pos_sim": pos})
