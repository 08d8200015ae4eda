"""The vectorised losses against plain reference computations (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslctl.losses import (
    byol_loss,
    min_batch,
    truncated_triplet_loss,
    truncated_triplet_loss_reference,
)


def _inputs(n: int, m: int, d: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    z = torch.randn(m, d, generator=g, dtype=dtype, requires_grad=True)
    return p, z


def _grads(fn, p, z, **kw):
    out = fn(p, z, **kw)
    gp, gz = torch.autograd.grad(out.loss, (p, z))
    return out, gp, gz


@pytest.mark.parametrize("n", [11, 32, 64])
def test_triplet_matches_loop_values_and_grads(n: int) -> None:
    p, z = _inputs(n, n, 16, seed=n)
    fast, gp_f, gz_f = _grads(truncated_triplet_loss, p, z)
    slow, gp_s, gz_s = _grads(truncated_triplet_loss_reference, p, z)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.d_ap, slow.d_ap, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.d_an, slow.d_an, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gp_f, gp_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gz_f, gz_s, rtol=1e-5, atol=1e-7)
    assert fast.loss.dtype == torch.float32 and fast.loss.ndim == 0
    assert not fast.d_ap.requires_grad and not fast.d_an.requires_grad


@pytest.mark.parametrize("n,world,rank", [(11, 2, 1), (16, 4, 2), (32, 3, 0)])
def test_triplet_gathered_negatives_with_offset(n: int, world: int, rank: int) -> None:
    # Negatives gathered across GPUs: z holds world·n rows and this rank's positives are
    # the block rank·n … rank·n + n − 1.
    p, z = _inputs(n, world * n, 8, seed=7 * n + rank)
    pos = rank * n + torch.arange(n)
    fast, gp_f, gz_f = _grads(truncated_triplet_loss, p, z, pos_index=pos)
    slow, gp_s, gz_s = _grads(truncated_triplet_loss_reference, p, z, pos_index=pos)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gp_f, gp_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gz_f, gz_s, rtol=1e-5, atol=1e-7)
    # every positive row of z receives a gradient through d_ap
    assert gz_f[pos].abs().sum(1).gt(0).all()


@pytest.mark.parametrize("drop,keep", [(0, 1), (0, 5), (2, 4), (3, 12)])
def test_triplet_drop_keep_variants_float64_exact(drop: int, keep: int) -> None:
    n = min_batch(drop, keep) + 3
    p, z = _inputs(n, n, 12, seed=drop * 10 + keep, dtype=torch.float64)
    kw = {"drop": drop, "keep": keep, "gamma": 1.5, "margin": 0.5}
    fast, gp_f, gz_f = _grads(truncated_triplet_loss, p, z, **kw)
    slow, gp_s, gz_s = _grads(truncated_triplet_loss_reference, p, z, **kw)
    assert fast.loss.dtype == torch.float64
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gp_f, gp_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gz_f, gz_s, rtol=1e-10, atol=1e-12)


def test_triplet_formula_by_hand() -> None:
    # d_an must be the mean of ranks drop+1 … drop+keep of the negatives, checked on D
    # computed as squared Euclidean distance of unit vectors minus 2 (SPEC §1).
    p, z = _inputs(12, 12, 6, seed=3, dtype=torch.float64)
    ph, zh = F.normalize(p.detach(), dim=1), F.normalize(z.detach(), dim=1)
    dist = torch.cdist(ph, zh) ** 2 - 2.0
    d_ap = dist.diagonal()
    masked = dist + torch.diag(torch.full((12,), float("inf"), dtype=torch.float64))
    d_an = masked.sort(dim=1).values[:, 2:6].mean(1)  # drop 2, keep 4
    expect = torch.relu(3.0 * d_ap - d_an + 0.1).mean()
    out = truncated_triplet_loss(p, z, gamma=3.0, margin=0.1, drop=2, keep=4)
    torch.testing.assert_close(out.loss, expect, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.d_an, d_an.mean(), rtol=1e-10, atol=1e-10)


def test_triplet_hinge_inactive_gives_zero_loss_and_grad() -> None:
    p, z = _inputs(11, 11, 4, seed=1)
    out = truncated_triplet_loss(p, z, margin=-100.0)
    assert out.loss.item() == 0.0
    (gp,) = torch.autograd.grad(out.loss, p)
    assert gp.abs().max().item() == 0.0


def test_triplet_scale_invariant_inputs() -> None:
    p, z = _inputs(20, 20, 8, seed=5)
    a = truncated_triplet_loss(p, z).loss
    b = truncated_triplet_loss(p * 7.0, z * 0.01).loss
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 10])
def test_triplet_too_small_batch_is_value_error(n: int) -> None:
    p, z = _inputs(n, n, 8, seed=0)
    with pytest.raises(ValueError, match=r"at least drop\+keep\+1 = 11 samples.*got " + str(n)):
        truncated_triplet_loss(p, z)
    assert min_batch(1, 9) == 11
    # ten samples suffice when one fewer negative is kept
    if n == 10:
        assert truncated_triplet_loss(p, z, keep=8).loss.isfinite()


def test_triplet_bad_shapes_are_value_errors() -> None:
    with pytest.raises(ValueError, match="n×d"):
        truncated_triplet_loss(torch.randn(12, 4), torch.randn(12, 5))
    with pytest.raises(ValueError, match="at least as many rows"):
        truncated_triplet_loss(torch.randn(14, 4), torch.randn(12, 4))
    with pytest.raises(ValueError, match="pos_index"):
        truncated_triplet_loss(torch.randn(12, 4), torch.randn(24, 4), torch.arange(6))


def test_triplet_fp32_under_autocast() -> None:
    p, z = _inputs(16, 16, 8, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = truncated_triplet_loss(p.bfloat16(), z.bfloat16())
    assert out.loss.dtype == torch.float32
    ref = truncated_triplet_loss_reference(p.bfloat16().float(), z.bfloat16().float())
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-5)


def test_triplet_sgd_steps_lower_loss() -> None:
    torch.manual_seed(0)
    p = torch.randn(24, 8, requires_grad=True)
    z = torch.randn(24, 8, requires_grad=True)
    p0, z0 = p.detach().clone(), z.detach().clone()
    opt = torch.optim.SGD([p, z], lr=2.0)
    losses = []
    for _ in range(30):
        out = truncated_triplet_loss(p, z)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 3.0
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    # positives pulled together (d_ap towards its minimum −2), negatives pushed apart
    first, final = truncated_triplet_loss_reference(p0, z0), truncated_triplet_loss(p, z)
    assert final.d_ap.item() < -1.9 < first.d_ap.item()
    assert final.d_an.item() > first.d_an.item()


def test_byol_loss_matches_formula_and_grad() -> None:
    p, z = _inputs(9, 9, 5, seed=4, dtype=torch.float64)
    loss = byol_loss(p, z)
    pn = p / p.norm(dim=1, keepdim=True)
    zn = z / z.norm(dim=1, keepdim=True)
    expect = ((pn - zn) ** 2).sum(1).mean()
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-12)
    g_loss = torch.autograd.grad(loss, (p, z))
    g_expect = torch.autograd.grad(expect, (p, z))
    for a, b in zip(g_loss, g_expect, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_byol_loss_range_and_autocast() -> None:
    p = torch.randn(6, 4)
    assert byol_loss(p, p).abs().item() < 1e-6
    assert abs(byol_loss(p, -p).item() - 4.0) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = byol_loss(p.bfloat16(), torch.randn(6, 4).bfloat16())
    assert out.dtype == torch.float32
    with pytest.raises(ValueError):
        byol_loss(torch.randn(6, 4), torch.randn(5, 4))
