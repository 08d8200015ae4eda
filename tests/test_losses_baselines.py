"""The baseline losses (NT-Xent, MoCo's InfoNCE with a queue, SimSiam's negative cosine) against
plain per-sample loops written here (values and gradients, float64), plus their dtype rules,
input checks, closed-form values and NT-Xent's gathered negatives (simulated in-process, and
for real over 2 gloo processes)."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sslctl.losses import info_nce_queue, negative_cosine, nt_xent
from tests import nt_xent_worker

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
VALUE_TOL: dict[str, Any] = {"rtol": 1e-10, "atol": 1e-12}
GRAD_TOL: dict[str, Any] = {"rtol": 1e-9, "atol": 1e-12}


def _randn(*shape: int, seed: int, grad: bool = True, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


# ---------------------------------------------------------------------------------------------
# References: one sample at a time, explicit exp / sum / log, no library loss.


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum()


def ref_nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, tau: float, world: int = 1, rank: int = 0
) -> torch.Tensor:
    """Rank ``rank``'s NT-Xent when the batch z1, z2 (world·n images) is split into ``world``
    equal slices: the anchors are the rank's 2n embeddings, the candidates all 2·world·n."""
    total_n = z1.shape[0]
    n = total_n // world
    emb = [_unit(z1[i]) for i in range(total_n)] + [_unit(z2[i]) for i in range(total_n)]
    anchors = [rank * n + i for i in range(n)] + [total_n + rank * n + i for i in range(n)]
    total = torch.zeros((), dtype=z1.dtype)
    for a in anchors:
        pos = a + total_n if a < total_n else a - total_n
        denom = torch.zeros((), dtype=z1.dtype)
        for c in range(2 * total_n):
            if c != a:
                denom = denom + torch.exp(_dot(emb[a], emb[c]) / tau)
        total = total - (_dot(emb[a], emb[pos]) / tau - torch.log(denom))
    return total / len(anchors)


def ref_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    total = torch.zeros((), dtype=q.dtype)
    for i in range(q.shape[0]):
        qi, ki = _unit(q[i]), _unit(k[i])
        pos = torch.exp(_dot(qi, ki) / tau)
        denom = pos
        for j in range(queue.shape[0]):
            denom = denom + torch.exp(_dot(qi, queue[j]) / tau)
        total = total - torch.log(pos / denom)
    return total / q.shape[0]


def ref_negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=p.dtype)
    for i in range(p.shape[0]):
        cos = _dot(p[i], z[i]) / (torch.sqrt(_dot(p[i], p[i])) * torch.sqrt(_dot(z[i], z[i])))
        total = total - cos
    return total / p.shape[0]


# ---------------------------------------------------------------------------------------------
# NT-Xent


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.1), (3, 7, 0.5), (8, 16, 1.0)])
def test_nt_xent_matches_loop_values_and_grads(n: int, d: int, tau: float) -> None:
    z1, z2 = _randn(n, d, seed=n), _randn(n, d, seed=100 + n)
    fast = nt_xent(z1, z2, tau)
    slow = ref_nt_xent(z1, z2, tau)
    assert fast.dtype == F64 and fast.ndim == 0
    torch.testing.assert_close(fast, slow, **VALUE_TOL)
    for gf, gs in zip(
        torch.autograd.grad(fast, (z1, z2)), torch.autograd.grad(slow, (z1, z2)), strict=True
    ):
        torch.testing.assert_close(gf, gs, **GRAD_TOL)


def _simulated_ranks(
    z1: torch.Tensor, z2: torch.Tensor, tau: float, world: int
) -> list[torch.Tensor]:
    """Each rank's nt_xent on its slice of the batch, with a fake gather standing in for
    ``gather_with_grad``: rank r's gather returns every rank's input in rank order, r's own
    (live) tensor at its place. A first pass records what each rank hands to its k-th gather
    call, so the fake knows nothing of how nt_xent lays out its gathered tensor. The recorded
    tensors keep their graph, so backward of the ranks' summed losses sends every rank's
    candidate gradient to the rows it came from, as the all-reduce in gather_with_grad does."""
    n = z1.shape[0] // world
    slices = [(z1[r * n : (r + 1) * n], z2[r * n : (r + 1) * n]) for r in range(world)]
    sent: list[list[torch.Tensor]] = []
    for r in range(world):
        calls: list[torch.Tensor] = []

        def record(x: torch.Tensor, calls: list[torch.Tensor] = calls) -> torch.Tensor:
            calls.append(x)
            return torch.cat([x] * world)

        nt_xent(*slices[r], tau, gather=record, rank=r)
        sent.append(calls)
    assert all(len(c) == len(sent[0]) >= 1 for c in sent)
    losses = []
    for r in range(world):
        counter = itertools.count()

        def fake(
            x: torch.Tensor, r: int = r, counter: itertools.count[int] = counter
        ) -> torch.Tensor:
            k = next(counter)
            assert x.shape == sent[r][k].shape
            return torch.cat([x if q == r else sent[q][k] for q in range(world)])

        losses.append(nt_xent(*slices[r], tau, gather=fake, rank=r))
    return losses


@pytest.mark.parametrize("world,n,d", [(2, 1, 4), (2, 3, 5), (3, 2, 6), (4, 2, 3)])
def test_nt_xent_gathered_ranks_equal_the_concatenated_batch(world: int, n: int, d: int) -> None:
    tau = 0.2
    z1, z2 = _randn(world * n, d, seed=world * 10 + n), _randn(world * n, d, seed=7 + n)
    losses = _simulated_ranks(z1, z2, tau, world)
    for r, loss in enumerate(losses):  # each rank against the loop over its anchors
        assert loss.dtype == F64 and loss.ndim == 0
        torch.testing.assert_close(loss, ref_nt_xent(z1, z2, tau, world, r), **VALUE_TOL)
    full = nt_xent(z1, z2, tau)
    torch.testing.assert_close(torch.stack(losses).mean(), full, **VALUE_TOL)
    torch.testing.assert_close(full, ref_nt_xent(z1, z2, tau), **VALUE_TOL)
    # Summed over ranks, every row's gradient is world × the single-process gradient (the
    # mean of the ranks' losses is the single-process loss).
    g_ranks = torch.autograd.grad(torch.stack(losses).sum(), (z1, z2))
    g_full = torch.autograd.grad(full, (z1, z2))
    for gr, gf in zip(g_ranks, g_full, strict=True):
        torch.testing.assert_close(gr / world, gf, **GRAD_TOL)


def test_nt_xent_identity_gather_is_the_single_process_loss() -> None:
    z1, z2 = _randn(5, 4, seed=1), _randn(5, 4, seed=2)
    torch.testing.assert_close(
        nt_xent(z1, z2, 0.5, gather=lambda x: x, rank=0), nt_xent(z1, z2, 0.5), **VALUE_TOL
    )


@pytest.mark.parametrize("n", [2, 3, 8])
def test_nt_xent_closed_form_values(n: int) -> None:
    tau = 0.1
    # identical views of orthogonal images: the positive has cosine 1, the 2n − 2 negatives 0
    eye = torch.eye(n, dtype=F64) * torch.arange(1, n + 1, dtype=F64).unsqueeze(1)  # any norms
    expected = math.log1p((2 * n - 2) * math.exp(-1 / tau))
    got = nt_xent(eye, eye.clone(), tau)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert got.item() < 1e-3  # near the minimum, 0
    # every embedding the same: chance over the 2n − 1 candidates
    same = torch.ones(n, 3, dtype=F64)
    assert nt_xent(same, same, tau).item() == pytest.approx(math.log(2 * n - 1), rel=1e-12)
    # scale invariance of the rows (they are normalised inside)
    z1, z2 = _randn(n, 4, seed=n, grad=False), _randn(n, 4, seed=n + 1, grad=False)
    scale = torch.rand(n, 1, dtype=F64, generator=torch.Generator().manual_seed(0)) + 0.1
    torch.testing.assert_close(nt_xent(z1 * scale, z2 / scale, tau), nt_xent(z1, z2, tau))


def test_nt_xent_input_checks() -> None:
    z = torch.randn(4, 3)

    def one_row_each(x: torch.Tensor) -> torch.Tensor:
        return x  # a "gather" over one rank

    bad: list[tuple[tuple, dict]] = [
        ((torch.randn(4), torch.randn(4), 0.5), {}),  # not 2-D
        ((z, torch.randn(4, 2), 0.5), {}),  # shapes differ
        ((z, torch.randn(5, 3), 0.5), {}),
        ((torch.randn(0, 3), torch.randn(0, 3), 0.5), {}),  # n = 0
        ((torch.randn(4, 0), torch.randn(4, 0), 0.5), {}),  # d = 0
        ((z, z, 0.0), {}),  # temperature
        ((z, z, -0.1), {}),
        ((z, z, float("nan")), {}),
        ((z, z, float("inf")), {}),
        ((torch.randn(1, 3), torch.randn(1, 3), 0.5), {}),  # n = 1 without gather: no negative
        ((torch.randn(1, 3), torch.randn(1, 3), 0.5), {"gather": one_row_each}),  # 1 in all
        ((z, z, 0.5), {"rank": 1}),  # rank without gather
        ((z, z, 0.5), {"gather": one_row_each, "rank": 1}),  # rank >= world
        ((z, z, 0.5), {"gather": one_row_each, "rank": -1}),
        ((z, z, 0.5), {"gather": lambda x: x[:, :3]}),  # wrong width
        ((z, z, 0.5), {"gather": lambda x: x[:3]}),  # rows not a multiple of n
    ]
    for args, kwargs in bad:
        with pytest.raises(ValueError):
            nt_xent(*args, **kwargs)
    # n = 1 per rank is fine once the gather brings other images
    z1 = torch.randn(1, 3)
    assert nt_xent(z1, z1, 0.5, gather=lambda x: torch.cat([x, -x]), rank=0).isfinite()


# ---------------------------------------------------------------------------------------------
# InfoNCE with a queue


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("n,K,d,tau", [(2, 1, 3, 0.07), (3, 5, 8, 0.2), (8, 16, 4, 1.0)])
def test_info_nce_matches_loop_values_and_grads(n: int, K: int, d: int, tau: float) -> None:
    q, k = _randn(n, d, seed=n), _randn(n, d, seed=50 + n)
    queue = _unit_rows(_randn(K, d, seed=K, grad=False)).requires_grad_()
    fast = info_nce_queue(q, k, queue, tau)
    slow = ref_info_nce(q, k, queue, tau)
    assert fast.dtype == F64 and fast.ndim == 0
    torch.testing.assert_close(fast, slow, **VALUE_TOL)
    gq_f, gk_f, gqueue_f = torch.autograd.grad(fast, (q, k, queue), allow_unused=True)
    (gq_s,) = torch.autograd.grad(slow, (q,))
    torch.testing.assert_close(gq_f, gq_s, **GRAD_TOL)
    assert gk_f is None and gqueue_f is None  # keys and queue are constants


def test_info_nce_closed_form_and_queue_used_as_given() -> None:
    tau, n, K = 0.1, 3, 4
    basis = torch.eye(n + K, dtype=F64)
    q, queue = basis[:n] * 3.0, basis[n:]  # queue orthogonal to every query
    expected = math.log1p(K * math.exp(-1 / tau))
    assert info_nce_queue(q, q * 0.5, queue, tau).item() == pytest.approx(expected, rel=1e-12)
    # the queue is not normalised inside: scaling it changes the loss, as the loop says
    q, k = _randn(n, 5, seed=3, grad=False), _randn(n, 5, seed=4, grad=False)
    queue = _unit_rows(_randn(K, 5, seed=5, grad=False))
    scaled = info_nce_queue(q, k, 2.0 * queue, tau)
    torch.testing.assert_close(scaled, ref_info_nce(q, k, 2.0 * queue, tau), **VALUE_TOL)
    assert not torch.allclose(scaled, info_nce_queue(q, k, queue, tau))


def test_info_nce_input_checks() -> None:
    q, queue = torch.randn(4, 3), torch.randn(6, 3)
    bad = [
        (torch.randn(4), torch.randn(4), queue, 0.2),
        (q, torch.randn(4, 2), queue, 0.2),
        (q, torch.randn(3, 3), queue, 0.2),
        (torch.randn(0, 3), torch.randn(0, 3), queue, 0.2),
        (q, q, torch.randn(6, 2), 0.2),  # queue width
        (q, q, torch.randn(3), 0.2),  # queue not 2-D
        (q, q, torch.randn(0, 3), 0.2),  # no negative
        (q, q, queue, 0.0),
        (q, q, queue, -1.0),
        (q, q, queue, float("nan")),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            info_nce_queue(*args)


# ---------------------------------------------------------------------------------------------
# SimSiam's negative cosine


@pytest.mark.parametrize("n,d", [(1, 2), (2, 3), (3, 9), (8, 16)])
def test_negative_cosine_matches_loop_values_and_grads(n: int, d: int) -> None:
    p, z = _randn(n, d, seed=n), _randn(n, d, seed=n + 20)
    fast = negative_cosine(p, z)
    slow = ref_negative_cosine(p, z)
    assert fast.dtype == F64 and fast.ndim == 0
    torch.testing.assert_close(fast, slow, **VALUE_TOL)
    gp_f, gz_f = torch.autograd.grad(fast, (p, z), allow_unused=True)
    (gp_s,) = torch.autograd.grad(slow, (p,))
    torch.testing.assert_close(gp_f, gp_s, **GRAD_TOL)
    assert gz_f is None  # stop-gradient on z


def test_negative_cosine_values_by_hand() -> None:
    x = _randn(6, 5, seed=9, grad=False)
    assert negative_cosine(x, x).item() == pytest.approx(-1.0, abs=1e-15)
    assert negative_cosine(x, -3.0 * x).item() == pytest.approx(1.0, abs=1e-15)
    e = torch.eye(4, dtype=F64)
    assert negative_cosine(e, e.roll(1, dims=0)).item() == 0.0
    # SimSiam's symmetric use: the mean of the two directions, a gradient to each prediction
    p1, p2 = _randn(4, 3, seed=1), _randn(4, 3, seed=2)
    z1, z2 = _randn(4, 3, seed=3), _randn(4, 3, seed=4)
    sym = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
    grads = torch.autograd.grad(sym, (p1, p2, z1, z2), allow_unused=True)
    assert grads[0] is not None and grads[1] is not None
    assert grads[2] is None and grads[3] is None


def test_negative_cosine_input_checks() -> None:
    for p, z in [
        (torch.randn(4), torch.randn(4)),
        (torch.randn(4, 3), torch.randn(4, 2)),
        (torch.randn(4, 3), torch.randn(5, 3)),
        (torch.randn(0, 3), torch.randn(0, 3)),
        (torch.randn(3, 0), torch.randn(3, 0)),
    ]:
        with pytest.raises(ValueError):
            negative_cosine(p, z)


# ---------------------------------------------------------------------------------------------
# All three: at least fp32, even under autocast


def _calls(dtype: torch.dtype) -> dict[str, Callable[[], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(6, 8, generator=g).to(dtype) for _ in range(2))
    queue = _unit_rows(torch.randn(10, 8, generator=g)).to(dtype)
    return {
        "nt_xent": lambda: nt_xent(a, b, 0.1),
        "info_nce_queue": lambda: info_nce_queue(a, b, queue, 0.1),
        "negative_cosine": lambda: negative_cosine(a, b),
    }


@pytest.mark.parametrize("name", ["nt_xent", "info_nce_queue", "negative_cosine"])
def test_fp32_under_bf16_autocast(name: str) -> None:
    plain = _calls(torch.float32)[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = _calls(torch.float32)[name]()
        from_bf16 = _calls(torch.bfloat16)[name]()
    assert plain.dtype == under.dtype == from_bf16.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=1e-6, atol=1e-6)  # no bf16 matmul inside
    assert _calls(F64)[name]().dtype == F64


# ---------------------------------------------------------------------------------------------
# NT-Xent over 2 real gloo processes


@pytest.mark.ddp
def test_nt_xent_two_gloo_ranks_equal_the_single_process_loss(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tests.nt_xent_worker", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w = nt_xent_worker
    z1, z2 = (z.requires_grad_() for z in w.full_batch())
    full = nt_xent(z1, z2, w.TAU)
    g1, g2 = torch.autograd.grad(full, (z1, z2))
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(w.WORLD)]
    torch.testing.assert_close(
        torch.stack([x["loss"] for x in ranks]).mean(), full.detach(), **VALUE_TOL
    )
    for i, x in enumerate(ranks):
        assert x["loss"].dtype == F64
        rows = slice(i * w.N_LOCAL, (i + 1) * w.N_LOCAL)
        # gather_with_grad's backward all-reduces (sums) the candidates' gradient over the
        # ranks, so each rank's input gradient is d(Σ_r loss_r)/dz = W · d(full loss)/dz on its
        # rows. DDP then averages the parameter gradients over the W ranks, which divides that
        # W back out: training follows the gradient of the single-process loss.
        torch.testing.assert_close(x["g1"] / w.WORLD, g1[rows], **GRAD_TOL)
        torch.testing.assert_close(x["g2"] / w.WORLD, g2[rows], **GRAD_TOL)
