"""Per-step schedules: lengths, end points, shapes of the curves, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from sslctl import UserError
from sslctl.engine.schedules import target_momentum, warmup_cosine


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
