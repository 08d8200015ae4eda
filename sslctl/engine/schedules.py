"""Per-step schedules indexed by the global optimizer step (0-based).

The step is the state (as in DINO), so resume is trivial. Each schedule is evaluated one step
at a time (``WarmupCosine(...)(k)``, ``TargetMomentum(...)(k)``, ``ReferenceLR(...)(k)``):
memory and start-up cost do not grow with the run's length (a 10⁹-step curve would be 8 GB as
float64). ``warmup_cosine`` and ``target_momentum`` list a whole curve (tests, plots).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sslctl import UserError


def _check_warmup(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise UserError(f"a schedule needs at least one optimizer step, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise UserError(
            f"warm-up of {warmup_steps} steps does not fit a run of {total_steps} steps; "
            "lower the warm-up epochs or raise train.epochs"
        )


def _check_momentum(m0: float, total_steps: int) -> None:
    if total_steps < 1:
        raise UserError(f"a schedule needs at least one optimizer step, got {total_steps}")
    if not 0.0 <= m0 <= 1.0:
        raise UserError(f"target momentum must be in [0, 1], got {m0}")


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up, then half a cosine (``optim.schedule: per-step``), at one step in O(1).

    Steps 0 … W−1 (W = ``warmup_steps``) rise linearly from ``start_factor·base``, reaching
    ``base`` at step W; steps W … K−1 follow a cosine from ``base`` to ``final_factor·base``,
    which the last step K−1 takes exactly. When the cosine part has a single step (K = W + 1)
    that step is ``base``. Steps past the end keep the last value. The paper code's schedule,
    whose cosine is per epoch over all epochs, is ``ReferenceLR``.
    """

    base: float
    total_steps: int
    warmup_steps: int
    start_factor: float = 1e-4
    final_factor: float = 0.0

    def __post_init__(self) -> None:
        _check_warmup(self.total_steps, self.warmup_steps)

    def __call__(self, k: int) -> float:
        k = min(max(k, 0), self.total_steps - 1)
        w, base = self.warmup_steps, self.base
        if k < w:
            return base * (self.start_factor + (1.0 - self.start_factor) * k / max(w, 1))
        n_cos = self.total_steps - w
        t = (k - w) / max(n_cos - 1, 1)
        final = self.final_factor * base
        return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class TargetMomentum:
    """BYOL's target EMA momentum at step k, in O(1): m(k) = 1 − (1 − m0)·(cos(πk/K) + 1)/2.

    k = 0 … K−1 with K = ``total_steps``. m(0) = m0 and m rises along a cosine towards 1. As in
    the reference (k/K, not k/(K−1)), the last value 1 − (1 − m0)·(1 − cos(π/K))/2 stays just
    below 1, so the last update still moves the target.
    """

    m0: float
    total_steps: int

    def __post_init__(self) -> None:
        _check_momentum(self.m0, self.total_steps)

    def __call__(self, k: int) -> float:
        k = min(max(k, 0), self.total_steps - 1)
        return 1.0 - (1.0 - self.m0) * 0.5 * (math.cos(math.pi * k / self.total_steps) + 1.0)


def warmup_cosine(
    base: float,
    total_steps: int,
    warmup_steps: int,
    start_factor: float = 1e-4,
    final_factor: float = 0.0,
) -> torch.Tensor:
    """The whole ``WarmupCosine`` curve: a float64 tensor of length ``total_steps``."""
    at = WarmupCosine(base, total_steps, warmup_steps, start_factor, final_factor)
    return torch.tensor([at(k) for k in range(total_steps)], dtype=torch.float64)


def target_momentum(m0: float, total_steps: int) -> torch.Tensor:
    """The whole ``TargetMomentum`` curve: a float64 tensor of length ``total_steps``."""
    at = TargetMomentum(m0, total_steps)
    return torch.tensor([at(k) for k in range(total_steps)], dtype=torch.float64)


@dataclass(frozen=True)
class ReferenceLR:
    """The paper code's lr (mmcv 1.0.3 ``CosineAnnealing`` with ``warmup='linear'``,
    ``warmup_by_epoch=True``) at optimizer step ``k`` (0-based), in O(1).

    mmcv's cosine is per epoch — constant within an epoch — over all E epochs, warm-up included;
    its warm-up is per micro-iteration and multiplies that epoch's cosine value. With S optimizer
    steps per epoch and A micro-batches per step, step k ends micro-iteration i = (k+1)·A − 1 of
    epoch e = ⌊k/S⌋:  c_e = m + (L − m)·(1 + cos(π·e/E))/2, and
    lr = c_e·(r + (1 − r)·i/W) while i < W = w·S·A, else c_e.
    """

    base: float  # L
    epochs: int  # E
    steps_per_epoch: int  # S
    accumulate: int  # A
    warmup_epochs: float  # w
    start_factor: float = 1e-4  # r
    min_lr: float = 0.0  # m

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.accumulate < 1:
            raise UserError(
                f"a schedule needs at least one epoch, step and micro-batch, got E={self.epochs}, "
                f"S={self.steps_per_epoch}, A={self.accumulate}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise UserError(
                f"optim.warmup_epochs {self.warmup_epochs} does not fit a run of {self.epochs} "
                "epochs; lower the warm-up or raise train.epochs"
            )

    def __call__(self, k: int) -> float:
        total = self.epochs * self.steps_per_epoch
        k = min(max(k, 0), total - 1)
        e = k // self.steps_per_epoch
        m, big_l = self.min_lr, self.base
        c = m + (big_l - m) * (1.0 + math.cos(math.pi * e / self.epochs)) / 2.0
        i = (k + 1) * self.accumulate - 1
        w = self.warmup_epochs * self.steps_per_epoch * self.accumulate
        if i < w:
            return c * (self.start_factor + (1.0 - self.start_factor) * i / w)
        return c
