"""Per-step schedules: lengths, end points, shapes of the curves, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from sslctl import UserError
from sslctl.engine.schedules import TargetMomentum, WarmupCosine, target_momentum, warmup_cosine


def test_warmup_cosine_end_points_and_shape() -> None:
    lr = warmup_cosine(4.8, total_steps=100, warmup_steps=10)
    assert lr.dtype == torch.float64 and lr.shape == (100,)
    assert lr[0].item() == pytest.approx(4.8e-4)
    assert lr[5].item() == pytest.approx(4.8 * (1e-4 + (1 - 1e-4) * 0.5))
    assert lr[10].item() == pytest.approx(4.8)  # warm-up ends exactly at base
    assert lr[-1].item() == 0.0
    warm, cos = lr[:11], lr[10:]
    assert (warm.diff() > 0).all()  # strictly increasing warm-up
    assert (cos.diff() < 0).all()  # strictly decreasing cosine
    assert torch.allclose(warm.diff(), warm.diff()[0].expand(10))  # linear
    # the cosine's midpoint sits at half of base
    mid = warmup_cosine(2.0, total_steps=21, warmup_steps=0)
    assert mid[10].item() == pytest.approx(1.0)


def test_warmup_cosine_final_factor_and_start_factor() -> None:
    lr = warmup_cosine(1.0, 50, 5, start_factor=0.1, final_factor=0.01)
    assert lr[0].item() == pytest.approx(0.1)
    assert lr[-1].item() == pytest.approx(0.01)
    assert lr.min().item() == pytest.approx(0.01)
    assert lr.max().item() == pytest.approx(1.0)


def test_warmup_cosine_without_warmup() -> None:
    lr = warmup_cosine(0.3, total_steps=7, warmup_steps=0)
    assert lr.shape == (7,)
    assert lr[0].item() == pytest.approx(0.3)
    assert lr[-1].item() == 0.0
    expect = [0.3 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)]
    assert lr.tolist() == pytest.approx(expect)


def test_warmup_cosine_tiny_runs() -> None:
    assert warmup_cosine(0.5, 1, 0).tolist() == [0.5]
    assert warmup_cosine(0.5, 1, 1).tolist() == pytest.approx([0.5e-4])
    assert warmup_cosine(0.5, 2, 1).tolist() == pytest.approx([0.5e-4, 0.5])
    assert warmup_cosine(0.5, 3, 1).tolist() == pytest.approx([0.5e-4, 0.5, 0.0])
    all_warm = warmup_cosine(1.0, 4, 4)
    assert all_warm.tolist() == pytest.approx([1e-4 + (1 - 1e-4) * k / 4 for k in range(4)])


@pytest.mark.parametrize("total,warmup", [(0, 0), (10, 11), (10, -1)])
def test_warmup_cosine_rejects_impossible_lengths(total: int, warmup: int) -> None:
    with pytest.raises(UserError):
        warmup_cosine(1.0, total, warmup)


def test_target_momentum_curve() -> None:
    k_total = 1000
    m = target_momentum(0.99, k_total)
    assert m.dtype == torch.float64 and m.shape == (k_total,)
    assert m[0].item() == pytest.approx(0.99)
    assert (m.diff() > 0).all()
    assert m[-1].item() < 1.0
    # k/K, as the reference: the last value is 1 − 0.01·(1 − cos(π/K))/2
    assert m[-1].item() == pytest.approx(1 - 0.01 * (1 - math.cos(math.pi / k_total)) / 2)
    assert m[500].item() == pytest.approx(0.995)


def test_target_momentum_edges() -> None:
    assert target_momentum(0.99, 1).tolist() == pytest.approx([0.99])
    assert target_momentum(0.996, 2).tolist() == pytest.approx([0.996, 0.998])
    assert (target_momentum(1.0, 5) == 1.0).all()
    with pytest.raises(UserError):
        target_momentum(0.99, 0)
    with pytest.raises(UserError):
        target_momentum(1.5, 10)


@pytest.mark.parametrize(
    ("total", "warm", "start", "final"),
    [
        (100, 10, 1e-4, 0.0),
        (7, 0, 1e-4, 0.0),
        (1, 1, 1e-4, 0.0),
        (3, 1, 0.1, 0.01),
        (4, 4, 1e-4, 0.0),
    ],
)
def test_per_step_lr_equals_the_curve(total: int, warm: int, start: float, final: float) -> None:
    curve = warmup_cosine(2.5, total, warm, start, final).tolist()
    at = WarmupCosine(2.5, total, warm, start, final)
    assert [at(k) for k in range(total)] == pytest.approx(curve, rel=1e-12, abs=1e-15)
    assert at(total + 5) == at(total - 1)  # past the end: the last value (max_steps overshoot)


def test_per_step_momentum_equals_the_curve() -> None:
    for total in (1, 2, 13, 1000):
        curve = target_momentum(0.996, total).tolist()
        at = TargetMomentum(0.996, total)
        assert [at(k) for k in range(total)] == pytest.approx(curve, rel=1e-12)


def test_per_step_schedules_cost_nothing_for_huge_runs() -> None:
    # bench_train_step once built 10⁹-step lists (≈100 GB); the per-step form is O(1).
    lr = WarmupCosine(4.8, 10**12, 10**10)
    assert lr(0) == pytest.approx(4.8e-4) and lr(10**10) == pytest.approx(4.8)
    assert lr(10**12 - 1) == pytest.approx(0.0, abs=1e-12)
    assert TargetMomentum(0.99, 10**12)(0) == pytest.approx(0.99)


def test_per_step_schedules_validate_like_the_curves() -> None:
    with pytest.raises(UserError, match="warm-up of 11 steps"):
        WarmupCosine(1.0, 10, 11)
    with pytest.raises(UserError, match="target momentum"):
        TargetMomentum(1.5, 10)
