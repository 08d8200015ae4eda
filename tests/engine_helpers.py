"""A deterministic in-memory loader with the data backends' interface, for engine tests."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sslctl import config, dist


class TensorLoader:
    def __init__(
        self, n: int, batch_size: int, size: int = 16, seed: int = 0, rank: int = 0, world: int = 1
    ):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.steps_per_epoch = (n // world) // batch_size

    def epoch(
        self, epoch: int, start_batch: int = 0, end_batch: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        end = self.steps_per_epoch if end_batch is None else min(end_batch, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        order = torch.randperm(len(self.images), generator=g)
        per_rank = len(order) // self.world
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        for b in range(start_batch, end):
            idx = mine[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx]
            # two "views": a flip and a brightness change, deterministic per sample
            yield x.flip(-1), (x * 0.8 + 0.1)


# demo-cpu is convnet4 + AdamW + single resolution; the engine tests keep exercising the paper's
# path: ResNet, LARS, γ = 2, multi-resolution views, no kNN monitor unless a test asks.
SMALL = [
    "model.arch=resnet18",
    "method.multires=true",
    "optim.name=lars",
    "optim.weight_decay=1e-6",
    "loss.gamma=2.0",
    "eval.knn_every=0",
    "model.small_stem=true",
    "model.proj_hidden=64",
    "model.proj_dim=32",
    "model.pred_hidden=64",
    "method.online_res_min=12",
    "method.online_res_max=16",
    "method.target_res_min=14",
    "method.target_res_max=16",
    "train.batch_size=12",
    "train.accumulate=2",
    "train.precision=fp32",
    "train.epochs=3",
    "train.log_every=1",
    "optim.lr=0.5",
    "optim.warmup_epochs=1",
    "ckpt.every_epochs=1",
    "ckpt.keep_last=10",
]

CPU = dist.DistInfo(0, 1, 0, torch.device("cpu"))


def small_cfg(*extra: str) -> config.Config:
    return config.load("demo-cpu", SMALL + list(extra))
