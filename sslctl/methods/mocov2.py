"""MoCo v2 (He et al., CVPR 2020; Chen et al., 2020): a query encoder, a momentum key encoder
and a queue of negative keys, with InfoNCE.

- Head: Linear → ReLU → Linear (2048-2048-128 on a ResNet-50), no BN; no predictor.
- Key encoder: the momentum copy of the query encoder, at a constant ``method.base_momentum``
  (0.999 in MoCo).
- Queue: ``method.queue_size`` unit keys (a buffer, saved in checkpoints and restored on
  resume); each micro-step's keys, gathered from every process, replace the oldest.
- Symmetric loss: each view is the query of the other's key; the two directions are averaged.
- BN of the key encoder: with several processes, shuffle-BN as in the MoCo code (the batch is
  gathered, permuted, each process encodes its share, and the keys are returned to their
  samples), so that batch statistics cannot leak which key matches which query. On one process,
  MoCo's split-batch BN: the encoders' BN layers take statistics over ``method.bn_splits``
  sub-batches of a shuffled batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import UserError, dist
from sslctl.config import Config
from sslctl.losses import info_nce_queue
from sslctl.methods.common import SiameseMethod, StepOut, feature_std


def moco_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear → ReLU → Linear, both with bias (MoCo v2's MLP head)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are taken over ``splits`` interleaved
    sub-batches (samples b, b+s, b+2s, … form sub-batch b), as if each were on its own GPU.
    The running statistics are the sub-batches' average; in eval mode it is plain BN, and its
    state dict is BatchNorm2d's (checkpoints load into a plain backbone)."""

    def __init__(self, num_features: int, splits: int, **kwargs: object):
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.splits
        if not self.training or s == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % s:
            raise ValueError(f"split BN: a batch of {n} does not split into {s} sub-batches")
        mean, var = self.running_mean, self.running_var
        assert mean is not None and var is not None and self.num_batches_tracked is not None
        run_mean, run_var = mean.repeat(s), var.repeat(s)
        out = F.batch_norm(
            x.reshape(n // s, c * s, h, w),
            run_mean,
            run_var,
            self.weight.repeat(s),
            self.bias.repeat(s),
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        ).reshape(n, c, h, w)
        if x.is_contiguous(memory_format=torch.channels_last):  # keep the layout (CUDA runs)
            out = out.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            mean.copy_(run_mean.view(s, c).mean(0))
            var.copy_(run_var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out


def split_batchnorm(module: nn.Module, splits: int) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a SplitBatchNorm2d (same parameters)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sbn = SplitBatchNorm2d(
                child.num_features, splits, eps=child.eps, momentum=child.momentum
            )
            sbn.load_state_dict(child.state_dict())
            setattr(module, name, sbn)
        else:
            split_batchnorm(child, splits)
    return module


def shuffled_forward(
    encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``encode`` applied to the samples of ``x`` (n×…) in a shuffled order, each result
    returned to its own sample: shuffle-BN.

    With several processes every rank's batch is gathered, one permutation of all W·n samples
    (drawn from ``generator``, seeded alike on every rank: no broadcast) assigns each rank n of
    them, and the keys are gathered back and un-shuffled; on one process the batch is permuted
    in place. ``encode`` must not need gradients.
    """
    n, world = x.shape[0], dist.world_size()
    if world == 1:
        perm = torch.randperm(n, generator=generator).to(x.device)
        return encode(x[perm])[torch.argsort(perm)]
    everyone = dist.gather_equal(x)
    perm = torch.randperm(world * n, generator=generator).to(x.device)
    mine = perm.view(world, n)[dist.rank()]
    keys = dist.gather_equal(encode(everyone[mine]))  # row j: the key of sample perm[j]
    start = dist.rank() * n
    return keys[torch.argsort(perm)[start : start + n]]


class MoCoV2(SiameseMethod):
    target_momentum = "constant"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m, world = cfg.method, dist.world_size()
        per_step = 2 * cfg.train.batch_size * world  # both views' keys from every process
        if m.queue_size < per_step:
            raise UserError(
                f"method.queue_size {m.queue_size} is smaller than the {per_step} keys one "
                f"micro-step adds (2 views × train.batch_size {cfg.train.batch_size} × {world} "
                "process(es)); raise method.queue_size"
            )
        if world == 1 and m.bn_splits > 1:
            split_batchnorm(self.online.encoder.backbone, m.bn_splits)
            assert self.target is not None
            split_batchnorm(self.target.backbone, m.bn_splits)
        g = torch.Generator().manual_seed(cfg.train.seed)  # the same queue on every rank
        queue = F.normalize(torch.randn(m.queue_size, cfg.model.proj_dim, generator=g), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.queue: torch.Tensor
        self.queue_ptr: torch.Tensor

    @staticmethod
    def build_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
        return moco_head(in_dim, hidden, out_dim)

    def build_predictor(self, cfg: Config) -> nn.Module | None:
        return None

    def keys(self, x: torch.Tensor, step: int, view: int) -> torch.Tensor:
        """Unit keys of ``x`` from the key encoder, through shuffle-BN (no gradient)."""
        g = torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + step) * 2 + view)
        target = self.target
        assert target is not None
        with torch.no_grad():
            return F.normalize(shuffled_forward(target, x, g).float(), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (m×d, m <= queue_size) over the oldest entries, wrapping around.

        Out of place: this step's loss still holds the old queue for its backward pass."""
        k = self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue = self.queue.index_copy(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr = (self.queue_ptr + keys.shape[0]) % k

    def step(self, online: nn.Module, v1: torch.Tensor, v2: torch.Tensor, step: int) -> StepOut:
        _, q1 = online(v1)
        _, q2 = online(v2)
        k1, k2 = self.keys(v1, step, 1), self.keys(v2, step, 2)
        tau = self.cfg.loss.temperature
        # the two directions averaged: each has the scale of MoCo's one-directional loss, for
        # which its lr (0.03 at batch 256) was tuned
        loss = (
            info_nce_queue(q1, k2, self.queue, tau) + info_nce_queue(q2, k1, self.queue, tau)
        ) / 2
        with torch.no_grad():
            pos = (F.normalize(q1.float(), dim=1) * k2).sum(1).mean()
        self.enqueue(torch.cat([dist.gather_equal(k1), dist.gather_equal(k2)]))
        return StepOut(loss, {"feat_std": feature_std(q1), "pos_sim": pos})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The common layout plus ``queue`` (queue_size × proj_dim) and ``queue_ptr``."""
        return {**super().state_tensors(), "queue": self.queue, "queue_ptr": self.queue_ptr}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        rest = dict(tensors)
        queue, ptr = rest.pop("queue", None), rest.pop("queue_ptr", None)
        if queue is None or ptr is None or queue.shape != self.queue.shape:
            raise RuntimeError(
                f"the MoCo queue is missing or has another shape (method.queue_size × "
                f"model.proj_dim = {tuple(self.queue.shape)})"
            )
        super().load_state_tensors(rest)
        self.queue = queue.to(self.queue.device, self.queue.dtype).clone()
        self.queue_ptr = ptr.to(self.queue_ptr.device, torch.long).clone().reshape(())
