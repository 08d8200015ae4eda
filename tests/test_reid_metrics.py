"""Re-ID metrics against a plain per-query reference (full sort, explicit junk removal)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sslctl import UserError
from sslctl.eval.reid import metrics as rm
from sslctl.eval.reid.metrics import LabeledFeatures, positive_ranks, summarize


def _reference_ranks(qf, qid, qcam, gf, gid, gcam, identical, *, pessimistic, lengths=None):
    """Per query: sorted 1-based positions of the positives in the junk-free list, or None."""
    scores = qf.astype(np.float64) @ gf.astype(np.float64).T  # exact: integer features
    out: list[np.ndarray | None] = []
    lengths = {} if lengths is None else lengths  # |L_q| of valid queries, for the caller
    for q in range(len(qid)):
        junk = (gid == -1) | ((gid == qid[q]) & (gcam == qcam[q]) & (qcam[q] >= 0) & (gcam >= 0))
        for qq, g in identical:
            if qq == q:
                junk[g] = True
        s, good = scores[q][~junk], gid[~junk] == qid[q]
        if qid[q] in (-1, 0) or not good.any():
            out.append(None)
            continue
        # lexsort: last key is primary. Among equal scores, pessimistic puts negatives first.
        order = np.lexsort((good if pessimistic else ~good, -s))
        out.append(np.nonzero(good[order])[0] + 1)
        lengths[q] = len(s)
    return out


def _reference_metrics(ranks, ap, denominator, max_rank=10):
    valid = [r for r in ranks if r is not None]
    denom = len(valid) if denominator == "valid" else len(ranks)
    cmc = [sum(r[0] <= k for r in valid) / denom for k in range(1, max_rank + 1)]
    total_ap = 0.0
    for r in valid:  # the loops of the reference scripts, hit by hit
        a = 0.0
        for i, pos in enumerate(r):
            precision = (i + 1) / pos
            if ap == "standard":
                a += precision / len(r)
            else:
                old = i / (pos - 1) if pos > 1 else 1.0
                a += (old + precision) / 2 / len(r)
        total_ap += a
    minp = sum(len(r) / r[-1] for r in valid) / len(valid)
    return cmc, total_ap / denom, minp


def _random_problem(rng, n_q, n_g, d=3) -> tuple[Any, ...]:
    qf = rng.integers(-1, 2, size=(n_q, d)).astype(np.float32)  # few values: many exact ties
    gf = rng.integers(-1, 2, size=(n_g, d)).astype(np.float32)
    qid = rng.integers(-1, 5, size=n_q)
    gid = rng.integers(-1, 5, size=n_g)  # −1 junk, 0 distractor
    qcam = rng.integers(-1, 3, size=n_q)  # −1 unknown camera
    gcam = rng.integers(-1, 3, size=n_g)
    n_pairs = int(rng.integers(0, 3))
    identical = sorted({(int(rng.integers(n_q)), int(rng.integers(n_g))) for _ in range(n_pairs)})
    return qf, qid, qcam, gf, gid, gcam, identical


def _labeled(f, ids, cams):
    return LabeledFeatures(torch.from_numpy(f), torch.from_numpy(ids), torch.from_numpy(cams))


def _run(problem, block=None):
    qf, qid, qcam, gf, gid, gcam, identical = problem
    pairs = torch.tensor(identical, dtype=torch.int64).reshape(-1, 2)
    return positive_ranks(
        _labeled(qf, qid, qcam), _labeled(gf, gid, gcam), block=block, identical=pairs
    )


def test_ranks_and_metrics_equal_reference_on_random_problems(monkeypatch):
    monkeypatch.setattr(rm, "_GEMM_TILE", 7)  # several score tiles per row; exact on integers
    rng = np.random.default_rng(0)
    seen_ties = seen_invalid = 0
    for trial in range(250):
        problem = _random_problem(rng, int(rng.integers(1, 9)), int(rng.integers(1, 30)))
        ranks = _run(problem, block=int(rng.integers(1, 4)))
        lengths: dict[int, int] = {}
        _reference_ranks(*problem, pessimistic=True, lengths=lengths)
        assert all(int(ranks.list_len[q]) == n for q, n in lengths.items()), trial
        for pessimistic in (True, False):
            ref = _reference_ranks(*problem, pessimistic=pessimistic)
            got = ranks.pess if pessimistic else ranks.opt
            for q, r in enumerate(ref):
                mine = got[ranks.offsets[q] : ranks.offsets[q + 1]].numpy()
                assert bool(ranks.valid[q]) == (r is not None), (trial, q)
                np.testing.assert_array_equal(mine, [] if r is None else r, err_msg=f"{trial}")
        seen_invalid += int((~ranks.valid).sum())
        if not ranks.valid.any():
            with pytest.raises(UserError, match="no query has a valid gallery match"):
                summarize(ranks)
            continue
        for ties, pess in (("pessimistic", True), ("optimistic", False)):
            ref = _reference_ranks(*problem, pessimistic=pess)
            for ap in ("standard", "trapezoid"):
                for denominator in ("valid", "all"):
                    got = summarize(ranks, ap=ap, denominator=denominator, ties=ties, max_rank=10)
                    cmc, m_ap, minp = _reference_metrics(ref, ap, denominator)
                    n = len(got.cmc)
                    np.testing.assert_allclose(got.cmc, cmc[:n], atol=1e-12)
                    assert got.rank1 == pytest.approx(cmc[0], abs=1e-12)
                    assert got.rank5 == pytest.approx(cmc[4], abs=1e-12)
                    assert got.mAP == pytest.approx(m_ap, abs=1e-12)
                    assert got.mINP == pytest.approx(minp, abs=1e-12)
        differ = sum(
            a is not None and not np.array_equal(a, b)
            for a, b in zip(
                _reference_ranks(*problem, pessimistic=True),
                _reference_ranks(*problem, pessimistic=False),
                strict=True,
            )
        )
        assert summarize(ranks).num_queries_with_ties == differ
        seen_ties += differ
    # The generator must actually exercise ties and invalid queries.
    assert seen_ties > 20 and seen_invalid > 20


def test_chunked_equals_unchunked_and_both_counting_paths_agree(monkeypatch):
    rng = np.random.default_rng(1)
    n_q, n_g = 23, 300
    qf = rng.standard_normal((n_q, 16)).astype(np.float32)
    gf = rng.standard_normal((n_g, 16)).astype(np.float32)
    gf[50:60] = gf[40:50]  # byte-identical gallery rows with different ids: exact ties
    qid = rng.integers(1, 8, size=n_q)
    gid = rng.integers(0, 8, size=n_g)
    qcam, gcam = rng.integers(0, 3, size=n_q), rng.integers(0, 3, size=n_g)
    problem = (qf, qid, qcam, gf, gid, gcam, [(0, 5), (3, 7)])
    one = _run(problem, block=1)
    full = _run(problem, block=n_q)
    assert int(one.offsets.diff().max()) > rm._COMPARE_MAX_K  # the searchsorted path ran
    for a, b in ((one.pess, full.pess), (one.opt, full.opt), (one.list_len, full.list_len)):
        assert torch.equal(a, b)
    monkeypatch.setattr(rm, "_COMPARE_MAX_K", 10**6)  # compare path for every block
    monkeypatch.setattr(rm, "_COUNT_CHUNK", 2 * n_g)  # ... counted two rows at a time
    compare = _run(problem, block=7)
    assert torch.equal(compare.pess, full.pess) and torch.equal(compare.opt, full.opt)


@pytest.mark.parametrize(
    ("ranked", "ranks", "rank1", "ap_std", "ap_trap"),
    [
        ("NPNP", (2, 4), 0.0, 0.5, 1 / 3),
        ("PNP", (1, 3), 1.0, 0.833333, 0.791667),
        ("NP", (2,), 0.0, 0.5, 0.25),
        ("NNNP", (4,), 0.0, 0.25, 0.125),
    ],
)
def test_hand_computed_vectors(ranked, ranks, rank1, ap_std, ap_trap):
    """REID.md §6.6: the gallery's scores decrease along the ranked list."""
    n = len(ranked)
    gf = torch.arange(n, 0, -1, dtype=torch.float32)[:, None]
    gid = torch.tensor([1 if c == "P" else 2 for c in ranked])
    query = LabeledFeatures(torch.ones(1, 1), torch.tensor([1]), torch.tensor([1]))
    gallery = LabeledFeatures(gf, gid, torch.full((n,), 2))
    r = positive_ranks(query, gallery)
    assert tuple(r.pess.tolist()) == ranks and r.list_len.tolist() == [n]
    std = summarize(r, ap="standard")
    trap = summarize(r, ap="trapezoid")
    assert std.rank1 == trap.rank1 == rank1
    assert std.mAP == pytest.approx(ap_std, abs=1e-6)
    assert trap.mAP == pytest.approx(ap_trap, abs=1e-6)


def test_junk_and_distractors_and_euclidean():
    # gallery: same id same camera (junk), id −1 (junk), distractor 0 ahead of the positive.
    query = LabeledFeatures(torch.tensor([[1.0, 0.0]]), torch.tensor([7]), torch.tensor([1]))
    gf = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.5, 0.5]])
    gallery = LabeledFeatures(gf, torch.tensor([7, -1, 0, 7]), torch.tensor([1, 2, 2, 3]))
    for metric in ("cosine", "euclidean"):
        r = positive_ranks(query, gallery, metric=metric)
        assert r.pess.tolist() == [2] and r.list_len.tolist() == [2]
    s = summarize(r, max_rank=50)
    assert len(s.cmc) == 2 and s.cmc == (0.0, 1.0) and s.rank10 == 1.0  # saturates past |L_q|


def test_tie_rules_differ_only_on_ties():
    query = LabeledFeatures(torch.ones(1, 1), torch.tensor([1]), torch.tensor([-1]))
    gallery = LabeledFeatures(torch.ones(3, 1), torch.tensor([2, 1, 2]), torch.full((3,), -1))
    r = positive_ranks(query, gallery)  # all scores equal: a collapsed model
    assert r.pess.tolist() == [3] and r.opt.tolist() == [1]
    assert summarize(r).rank1 == 0.0 and summarize(r, ties="optimistic").rank1 == 1.0
    assert summarize(r).num_queries_with_ties == 1


def test_denominator_all_counts_invalid_queries_as_zero():
    qf = torch.tensor([[1.0], [1.0]])
    query = LabeledFeatures(qf, torch.tensor([1, 5]), torch.tensor([1, 1]))
    gallery = LabeledFeatures(
        torch.tensor([[1.0], [0.5]]), torch.tensor([1, 2]), torch.tensor([2, 2])
    )
    r = positive_ranks(query, gallery)
    assert r.valid.tolist() == [True, False]
    assert summarize(r).rank1 == 1.0 and summarize(r, denominator="all").rank1 == 0.5


def test_block_size_and_memory_bound():
    assert rm.block_size(1000, 479_730) == (1 << 30) // (11 * 479_730) == 203
    assert rm.block_size(5, 10) == 5 and rm.block_size(10, 10**12) == 1
    assert rm.memory_bound(1000, 100, 8, 10) == 4 * 8 * 1100 + 10 * 100 * 11


def test_rank_cache_round_trip():
    rng = np.random.default_rng(3)
    r = _run(_random_problem(rng, 6, 20))
    back = rm.PositiveRanks.from_tensors(r.to_tensors())
    for name in ("offsets", "pess", "opt", "list_len", "valid"):
        assert torch.equal(getattr(back, name), getattr(r, name))
