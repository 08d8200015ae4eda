"""Re-identification metrics: exact positive ranks in query blocks, without sorting any row.

Definitions are REID.md §6; the algorithm is §8.2. For each query q the junk-free ranked list
L_q holds every gallery image except junk (identity −1, same identity *and* same known camera,
optionally byte-identical files). Every metric derives from the 1-based positions r_1 < … < r_m
of the m positives in L_q:

    pessimistic ties (default): r_j = j + |{negatives n : s_n ≥ t_j}|
    optimistic ties:            r_j = j + |{negatives n : s_n > t_j}|

where t_1 ≥ … ≥ t_m are the positives' scores. Per block of b queries, one fp32 GEMM gives the
scores S (b × n_g); the positives' scores are read back from S (never recomputed, so a positive
and the negatives it is compared with are bit-consistent); each negative is bucketed by how
many positive scores it beats (a compare for small m, ``searchsorted`` otherwise) and a
per-row histogram gives every r_j. Cost: the GEMM plus O(b·n_g·log m) elementwise work.

Memory bound (bytes): 4·d·(n_g + n_q) for the features + b·n_g·11 for one block
(scores fp32 4, bucket index int32 4, boolean masks 3) + O(n_q·m) for the ranks; the block size
is b = ⌊budget / (11·n_g)⌋ clipped to [1, n_q]. No n_q × n_g matrix is held unless it fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sslctl import UserError
from sslctl.eval.features import true_fp32

TIE_RULES = ("pessimistic", "optimistic")
AP_DEFINITIONS = ("standard", "trapezoid")
DENOMINATORS = ("valid", "all")
SCORE_METRICS = ("cosine", "euclidean")
BYTES_PER_SCORE = 11  # scores fp32 (4) + bucket index int32 (4) + bool masks (3), REID.md §8.3
DEFAULT_MEM_BUDGET = 1 << 30  # bytes for one query block
# Up to this many positives per query, one compare-and-count pass per positive beats
# searchsorted + bincount (SYSU-30k has exactly one positive per query).
_COMPARE_MAX_K = 4
_GEMM_TILE = 1 << 15  # gallery columns per score GEMM call
_COUNT_CHUNK = 1 << 20  # scores per compare-and-count chunk: ≤ 9 MB of temporaries


@dataclass(frozen=True)
class LabeledFeatures:
    """Features (n×d float) with identity (−1 junk, 0 distractor) and camera (−1 unknown)."""

    features: torch.Tensor
    ids: torch.Tensor  # int64 (n,)
    cams: torch.Tensor  # int64 (n,)


@dataclass(frozen=True)
class PositiveRanks:
    """Positive positions in each query's junk-free list, in CSR layout (REID.md §6.3 cache).

    Query q's ranks are ``pess[offsets[q]:offsets[q+1]]`` (ascending, 1-based), likewise
    ``opt``. ``list_len[q]`` = |L_q|. Everything the summary needs, so that changing the AP
    definition, denominator, tie rule or max rank never recomputes scores.
    """

    offsets: torch.Tensor  # int64 (n_q + 1,)
    pess: torch.Tensor  # int64 (Σ m_q,)
    opt: torch.Tensor  # int64 (Σ m_q,)
    list_len: torch.Tensor  # int64 (n_q,)
    valid: torch.Tensor  # bool (n_q,): m_q > 0 and identity not in {−1, 0}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "offsets": self.offsets,
            "r_pess": self.pess,
            "r_opt": self.opt,
            "list_len": self.list_len,
            "valid": self.valid.to(torch.uint8),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> PositiveRanks:
        return cls(t["offsets"], t["r_pess"], t["r_opt"], t["list_len"], t["valid"].bool())


@dataclass(frozen=True)
class ReidMetrics:
    """Fractions in [0, 1]; ``cmc[k-1]`` is rank-k."""

    cmc: tuple[float, ...]
    rank1: float
    rank5: float
    rank10: float
    mAP: float
    mINP: float
    num_queries: int
    num_valid_queries: int
    num_queries_with_ties: int
    ap_definition: str
    denominator: str
    ties: str


def block_size(n_q: int, n_g: int, mem_budget: int = DEFAULT_MEM_BUDGET) -> int:
    """Queries per block so that one block's working set stays within mem_budget bytes."""
    return max(1, min(n_q, mem_budget // (BYTES_PER_SCORE * max(n_g, 1))))


def memory_bound(n_q: int, n_g: int, dim: int, block: int) -> int:
    """Peak bytes of ranking: fp32 features + one block's working set (REID.md §8.3)."""
    return 4 * dim * (n_g + n_q) + block * n_g * BYTES_PER_SCORE


def positive_lists(
    query: LabeledFeatures, gallery: LabeledFeatures, identical: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets, gallery indices) of every query's positives (CSR) and |L_q|, from labels alone.

    Positives of q: same identity, not junk (gallery −1, same known camera, or an ``identical``
    (q, g) pair). Queries with identity −1 or 0 get none: they are invalid, and a distractor
    query would otherwise expand to every distractor (SYSU: 478k); their |L_q| ignores the
    same-camera rule. All on CPU, O(n_g log n_g + Σ|same identity|).
    """
    qid, qcam = query.ids.cpu(), query.cams.cpu()
    gid, gcam = gallery.ids.cpu(), gallery.cams.cpu()
    n_q, n_g = len(qid), len(gid)
    order = torch.argsort(gid, stable=True)  # stable: gallery order inside one identity
    sorted_ids = gid[order]
    lo = torch.searchsorted(sorted_ids, qid)
    count = torch.searchsorted(sorted_ids, qid, right=True) - lo
    count[(qid == -1) | (qid == 0)] = 0
    qrep = torch.repeat_interleave(torch.arange(n_q), count)
    start = torch.cumsum(count, 0) - count
    cand = order[lo[qrep] + torch.arange(len(qrep)) - start[qrep]]
    junk = (gcam[cand] == qcam[qrep]) & (qcam[qrep] >= 0) & (gcam[cand] >= 0)
    list_len = n_g - int((gid == -1).sum()) - torch.bincount(qrep[junk], minlength=n_q)
    keep = ~junk
    if identical is not None and len(identical):
        pq, pg = identical[:, 0].cpu(), identical[:, 1].cpu()
        cam_junk = (gid[pg] == qid[pq]) & (gcam[pg] == qcam[pq]) & (qcam[pq] >= 0) & (gcam[pg] >= 0)
        already = (gid[pg] == -1) | cam_junk
        list_len -= torch.bincount(pq[~already], minlength=n_q)
        keep &= ~torch.isin(qrep * n_g + cand, pq * n_g + pg)
    offsets = torch.zeros(n_q + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(qrep[keep], minlength=n_q), 0)
    return offsets, cand[keep], list_len


class _Workspace:
    """One block's working set, allocated once and reused by every block (REID.md §8.3).

    scores fp32 (4 B per score) + notneg bool (1 B) + bucket int32 (4 B, only once some query
    has more than _COMPARE_MAX_K positives) + a compare chunk. Allocating tens of MB afresh per
    block lets glibc's heap fragment around the small results kept alive, and the process then
    grows block after block; reusing the buffers keeps the peak at the bound.
    """

    def __init__(self, rows: int, n_g: int, device: torch.device):
        self.scores = torch.empty((rows, n_g), dtype=torch.float32, device=device)
        self.notneg = torch.empty((rows, n_g), dtype=torch.bool, device=device)
        self.chunk_rows = max(1, min(rows, _COUNT_CHUNK // max(n_g, 1)))
        self.compare = torch.empty((self.chunk_rows, n_g), dtype=torch.bool, device=device)
        self._bucket: torch.Tensor | None = None

    def bucket(self, rows: int) -> torch.Tensor:
        if self._bucket is None:
            self._bucket = torch.empty_like(self.scores, dtype=torch.int32)
        return self._bucket[:rows]


def _count_ahead(
    scores: torch.Tensor, thresholds: torch.Tensor, pessimistic: bool, ws: _Workspace
) -> torch.Tensor:
    """ahead[i, j] = #entries of scores[i] that rank ahead of the j-th smallest threshold.

    scores (b, n_g): negatives' scores, −inf elsewhere. thresholds (b, K): positives' scores
    ascending, +inf padding. Pessimistic counts s ≥ t (a tie goes to the negative), optimistic
    s > t. Returns (b, K) int64.
    """
    b, k = thresholds.shape
    if k <= _COMPARE_MAX_K:
        # Row chunks: a bool reduction materialises an int64 copy (8 B per score) internally.
        ahead = torch.empty((k, b), dtype=torch.int64, device=scores.device)
        compare = torch.ge if pessimistic else torch.gt
        for j in range(k):
            for r in range(0, b, ws.chunk_rows):
                s, t = scores[r : r + ws.chunk_rows], thresholds[r : r + ws.chunk_rows, j : j + 1]
                mask = compare(s, t, out=ws.compare[: s.shape[0]])
                torch.sum(mask, dim=1, out=ahead[j, r : r + s.shape[0]])
        return ahead.T
    # bucket c = how many thresholds the score reaches; a negative in bucket c is ahead of the
    # c smallest positives, so ahead[j] = Σ_{c > j} hist[c] (a reverse cumulative sum).
    if b * (k + 1) < 2**31:
        bucket = torch.searchsorted(
            thresholds, scores, right=pessimistic, out_int32=True, out=ws.bucket(b)
        )
    else:  # row offsets would overflow int32: a one-off int64 index
        bucket = torch.searchsorted(thresholds, scores, right=pessimistic)
    bucket.add_((torch.arange(b, device=scores.device, dtype=bucket.dtype) * (k + 1))[:, None])
    hist = torch.bincount(bucket.view(-1), minlength=b * (k + 1)).view(b, k + 1)
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]


def _block_ranks(
    scores: torch.Tensor,
    pos: torch.Tensor,
    m: torch.Tensor,
    notneg: torch.Tensor,
    ws: _Workspace,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened ascending ranks (pessimistic, optimistic) of one block's positives.

    scores (b, n_g) is modified in place. pos (b, K) gallery indices of the positives, padded;
    m (b,) their counts; notneg (b, n_g) marks junk and positives.
    """
    k = pos.shape[1]
    slot = torch.arange(k, device=scores.device)[None, :] < m[:, None]
    # Positive scores are read from the same GEMM output as the negatives' (bit-consistent).
    thresholds = scores.gather(1, pos).masked_fill_(~slot, float("inf")).sort(dim=1).values
    scores.masked_fill_(notneg, float("-inf"))
    out = []
    for pessimistic in (True, False):
        ahead = _count_ahead(scores, thresholds, pessimistic, ws)
        # The j-th smallest positive score has m − j positives at or above it (0-based j).
        rank = (m[:, None] - torch.arange(k, device=scores.device)[None, :]) + ahead
        rank = rank.masked_fill_(~slot, torch.iinfo(torch.int64).max).sort(dim=1).values
        out.append(rank[slot].cpu())  # row-major: query by query, ascending
    return out[0], out[1]


def _scores(
    q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """Cosine: q·g (features already L2-normalised). Euclidean: −‖q − g‖² = 2q·g − ‖q‖² − ‖g‖².

    The GEMM writes gallery tiles straight into ``out``: for some shapes (b = 32…50 on MKL)
    one whole-row GEMM allocates a second score-sized buffer, which would break the bound.
    """
    with true_fp32():  # TF32 would make near-tie ranks depend on the device
        for j in range(0, g.shape[0], _GEMM_TILE):
            torch.mm(q, g[j : j + _GEMM_TILE].T, out=out[:, j : j + _GEMM_TILE])
    s = out
    if g_sq is not None:
        s.mul_(2).sub_(q.square().sum(1, keepdim=True)).sub_(g_sq[None, :])
    return s


def _padded_positives(
    offsets: torch.Tensor, idx: torch.Tensor, q0: int, q1: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos (b, K) gallery indices padded with 0, m (b,)) for queries [q0, q1)."""
    m = offsets[q0 + 1 : q1 + 1] - offsets[q0:q1]
    k = int(m.max()) if q1 > q0 else 0
    pos = torch.zeros((q1 - q0, k), dtype=torch.int64)
    pos[torch.arange(k)[None, :] < m[:, None]] = idx[int(offsets[q0]) : int(offsets[q1])]
    return pos, m


def positive_ranks(
    query: LabeledFeatures,
    gallery: LabeledFeatures,
    *,
    metric: str = "cosine",
    block: int | None = None,
    identical: torch.Tensor | None = None,
    on_block: Callable[[int], None] | None = None,
) -> PositiveRanks:
    """Exact positive ranks of every query, in blocks of ``block`` queries (REID.md §8.2).

    Runs on the gallery features' device; features must be fp32 (L2-normalised for cosine).
    ``identical`` (P, 2) int64 lists (query, gallery) pairs to treat as junk. The result does
    not depend on ``block`` (it only partitions queries).
    """
    if metric not in SCORE_METRICS:
        raise UserError(f"unknown --metric '{metric}' (known: {', '.join(SCORE_METRICS)})")
    g = gallery.features
    n_q, n_g = len(query.ids), len(gallery.ids)
    device = g.device
    gid, qid = gallery.ids.to(device), query.ids.to(device)
    gjunk = gid == -1
    g_sq = g.square().sum(1) if metric == "euclidean" else None
    offsets, pidx, list_len = positive_lists(query, gallery, identical)
    b = min(block or block_size(n_q, n_g), max(n_q, 1))
    ws = _Workspace(b, n_g, device)
    pess, opt = [], []
    for q0 in range(0, n_q, b):
        q1 = min(q0 + b, n_q)
        pos, m = _padded_positives(offsets, pidx, q0, q1)
        if pos.shape[1] > 0:  # else every query of the block is invalid: nothing to rank
            scores = _scores(query.features[q0:q1].to(device), g, g_sq, ws.scores[: q1 - q0])
            # Not a negative: junk or same identity (positives and same-camera junk alike).
            notneg = torch.eq(gid[None, :], qid[q0:q1, None], out=ws.notneg[: q1 - q0])
            notneg |= gjunk[None, :]
            if identical is not None and len(identical):
                sel = identical[(identical[:, 0] >= q0) & (identical[:, 0] < q1)].to(device)
                notneg[sel[:, 0] - q0, sel[:, 1]] = True
            rp, ro = _block_ranks(scores, pos.to(device), m.to(device), notneg, ws)
            pess.append(rp)
            opt.append(ro)
        if on_block is not None:
            on_block(q1 - q0)
    empty = torch.empty(0, dtype=torch.int64)
    qid_cpu = query.ids.cpu()
    return PositiveRanks(
        offsets=offsets,
        pess=torch.cat(pess) if pess else empty,
        opt=torch.cat(opt) if opt else empty,
        list_len=list_len,
        valid=(offsets.diff() > 0) & (qid_cpu != -1) & (qid_cpu != 0),
    )


def _per_query_ap(ranks: torch.Tensor, offsets: torch.Tensor, ap: str) -> torch.Tensor:
    """AP of every query (0 where m = 0) from its ascending positive ranks (REID.md §6.3)."""
    m = offsets.diff()
    q_of = torch.repeat_interleave(torch.arange(len(m)), m)
    j = (torch.arange(len(ranks)) - offsets[:-1][q_of] + 1).double()  # 1-based hit number
    r = ranks.double()
    precision = j / r
    if ap == "standard":
        term = precision
    else:  # trapezoid: mean of the precision just before and at each hit; devkit starts at 1
        before = torch.where(r > 1, (j - 1) / (r - 1).clamp(min=1), torch.ones_like(r))
        term = 0.5 * (before + precision)
    total = torch.zeros(len(m), dtype=torch.float64).index_add_(0, q_of, term)
    return total / m.clamp(min=1)


def summarize(
    ranks: PositiveRanks,
    *,
    ap: str = "standard",
    denominator: str = "valid",
    ties: str = "pessimistic",
    max_rank: int = 50,
) -> ReidMetrics:
    """CMC, mAP and mINP from cached positive ranks; raises when no query is valid."""
    for name, value, known in (
        ("--ap", ap, AP_DEFINITIONS),
        ("--denominator", denominator, DENOMINATORS),
        ("--ties", ties, TIE_RULES),
    ):
        if value not in known:
            raise UserError(f"{name} must be one of {', '.join(known)}, got '{value}'")
    n_q, valid = len(ranks.valid), ranks.valid
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise UserError(
            f"no query has a valid gallery match ({n_q} queries; check ids/cameras or --layout)"
        )
    r = ranks.pess if ties == "pessimistic" else ranks.opt
    m = ranks.offsets.diff()
    first = r[ranks.offsets[:-1][valid]].double()
    last = r[ranks.offsets[1:][valid] - 1].double()
    denom = n_valid if denominator == "valid" else n_q
    shown = max(1, min(max_rank, int(ranks.list_len.max())))  # CMC saturates past |L_q|

    def rank_k(k: int) -> float:  # CMC_q(k) = [r_1 ≤ k]
        return float((first <= k).sum()) / denom

    ap_q = _per_query_ap(r, ranks.offsets, ap)
    q_of = torch.repeat_interleave(torch.arange(n_q), m)
    return ReidMetrics(
        cmc=tuple(rank_k(k) for k in range(1, shown + 1)),
        rank1=rank_k(1),
        rank5=rank_k(5),
        rank10=rank_k(10),
        mAP=float(ap_q[valid].sum()) / denom,
        mINP=float((m[valid].double() / last).sum()) / n_valid,
        num_queries=n_q,
        num_valid_queries=n_valid,
        num_queries_with_ties=len(torch.unique(q_of[ranks.pess != ranks.opt])),
        ap_definition=ap,
        denominator=denominator,
        ties=ties,
    )
