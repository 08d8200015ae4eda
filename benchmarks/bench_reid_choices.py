"""eval-reid: how far rank-1 and mAP move between bf16 and fp32 features, and between the flip
fusions ``legacy-triplet`` (the SYSU-30k default, the paper's script) and ``sum``.

Part 1, real forwards: generated person-crop stand-ins (an identity = clothing colours, a bag on
one side; an image = background, position, size, brightness, noise) in a SYSU-30k-like split:
each query (camera 2) has one gallery match (camera 1) among distractors (identity 0). A
randomly initialised ResNet encodes them through the real path (``extract_features`` over
``ReidImages``: PIL bicubic 256×128; bf16 autocast, or fp32 under ``true_fp32``). Each image
and its mirror are encoded once per precision and both fusions reuse them through the real
``_fuse``; ranking is the real exact ranking, scored as eval-reid scores sysu30k (trapezoid AP,
all queries) and with the standard AP.

Part 2, synthetic features, fusion only, at a larger scale: non-negative 2048-d "GAP" features
with identity structure (identity centre + per-image nuisance shared by both views + per-view
noise), rescaled to a given mean norm. ``sum`` does not depend on the norm; ``legacy-triplet``
adds the unit-length image feature to the raw mirror feature, so with a norm ≫ 1 it is nearly
the mirror's feature alone. Part 1 prints the norm a real backbone produces.

    python benchmarks/bench_reid_choices.py 2>/dev/null    # 1–3 min on a loaded 2-core CPU
    python benchmarks/bench_reid_choices.py --ids 100 --distractors 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from sslctl.backbones import build_backbone
from sslctl.eval.features import _fuse, extract_features, true_fp32
from sslctl.eval.reid import metrics as rmx
from sslctl.eval.reid.layouts import ReidImages

FUSIONS = ("legacy-triplet", "sum")


def _person(ident: np.random.Generator, img: np.random.Generator) -> np.ndarray:
    """A 128×64 RGB crop: identity colours and bag side from ``ident``, the rest from ``img``."""
    top, legs, skin, bag = ident.integers(0, 256, (4, 3))
    bag_left = ident.random() < 0.5
    h, w = 128, 64
    pix = np.empty((h, w, 3))
    bg = 128 + img.integers(-40, 41, (2, 3))  # a muted gradient: the person sets the colours
    pix[:] = bg[0] + (bg[1] - bg[0]) * np.linspace(0, 1, h)[:, None, None]
    s = img.uniform(0.85, 1.1)
    cx, y0 = w // 2 + img.integers(-6, 7), 8 + img.integers(-5, 6)
    hw, head = int(14 * s), int(9 * s)
    yy, xx = np.ogrid[:h, :w]
    pix[(yy - y0 - head) ** 2 + (xx - cx) ** 2 <= head**2] = skin
    t0, t1, l1 = y0 + 2 * head, y0 + 2 * head + int(42 * s), min(h, y0 + 2 * head + int(92 * s))
    pix[t0:t1, max(0, cx - hw) : cx + hw] = top
    pix[t1:l1, max(0, cx - hw + 2) : cx + hw - 2] = legs
    bx = cx - hw - 7 if bag_left else cx + hw - 1
    pix[t0 + 10 : t1 + 4, max(0, bx) : max(0, bx + 8)] = bag
    pix = pix * img.uniform(0.75, 1.25) + img.normal(0, 10, pix.shape)
    return np.clip(pix, 0, 255).astype(np.uint8)


def _make_split(root: Path, ids: int, distractors: int, seed: int) -> dict:
    """SYSU-30k-like query/gallery JPEGs and labels: query i's only match is gallery image i."""
    rng = np.random.default_rng(seed)
    q_paths, g_paths = [], []
    for i in range(ids + distractors):
        for split in ("query", "gallery") if i < ids else ("gallery",):
            crop = _person(np.random.default_rng([seed, i]), rng)  # same identity, new image
            p = root / split / f"{i:06d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).save(p, quality=90)
            (q_paths if split == "query" else g_paths).append(p)
    gid = torch.cat([torch.arange(1, ids + 1), torch.zeros(distractors, dtype=torch.int64)])
    return {
        "q_paths": q_paths,
        "g_paths": g_paths,
        "qid": torch.arange(1, ids + 1),
        "gid": gid,
    }


class _Mirrored(Dataset):
    """The same images, horizontally flipped (the second view of the fusion)."""

    def __init__(self, base: ReidImages):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, h, j = self.base[i]
        return x.flip(2), h, j


def _views(model, paths, precision: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unfused, unnormalised) features of the images and of their mirrors."""
    kw = dict(batch_size=batch, device="cpu", precision=precision, flip=False, normalize=False)
    images = ReidImages(paths)
    with true_fp32():  # as eval-reid: fp32 is true fp32; bf16 autocast is unaffected
        f = extract_features(model, images, **kw)
        f_flip = extract_features(model, _Mirrored(images), **kw)
    return f, f_flip


def _scores(qf, qid, gf, gid) -> dict:
    """Rank-1 and mAP (%) under the sysu30k defaults and with the standard AP; first-hit ranks."""
    q = rmx.LabeledFeatures(qf, qid, torch.full_like(qid, 2))
    g = rmx.LabeledFeatures(gf, gid, torch.ones_like(gid))
    ranks = rmx.positive_ranks(q, g)
    trap = rmx.summarize(ranks, ap="trapezoid", denominator="all")
    std = rmx.summarize(ranks, ap="standard", denominator="all")
    return {
        "rank1": 100 * trap.rank1,
        "mAP_trapezoid": 100 * trap.mAP,
        "mAP_standard": 100 * std.mAP,
        "ties": trap.num_queries_with_ties,
        "first": ranks.pess[ranks.offsets[:-1]],
    }


def _fused(f: torch.Tensor, f_flip: torch.Tensor, fusion: str) -> torch.Tensor:
    return F.normalize(_fuse(f, f_flip, fusion), dim=1)


def real_forwards(a: argparse.Namespace) -> tuple[list[dict], float]:
    torch.manual_seed(a.seed)
    model = build_backbone(a.arch)
    rows, feats, norm = [], {}, 0.0
    with tempfile.TemporaryDirectory() as d:
        s = _make_split(Path(d), a.ids, a.distractors, a.seed)
        for precision in ("fp32", "bf16"):
            t0 = time.perf_counter()
            qv = _views(model, s["q_paths"], precision, a.batch)
            gv = _views(model, s["g_paths"], precision, a.batch)
            print(f"  {precision} forwards: {time.perf_counter() - t0:.1f} s", flush=True)
            for fusion in FUSIONS:
                feats[precision, fusion] = (_fused(*qv, fusion), _fused(*gv, fusion))
            if precision == "fp32":
                norm = float(gv[1].norm(dim=1).mean())
    fp32: dict[str, dict] = {}
    for (precision, fusion), (qf, gf) in feats.items():  # fp32 first
        r = _scores(qf, s["qid"], gf, s["gid"])
        ref = fp32.setdefault(fusion, r)  # bf16 is compared with fp32 under the same fusion
        cos = F.cosine_similarity(gf, feats["fp32", fusion][1], dim=1)
        rows.append({
            "precision": precision,
            "fusion": fusion,
            **{k: v for k, v in r.items() if k != "first"},
            "first_hit_rank_changed": int((r["first"] != ref["first"]).sum()),
            "rank1_hit_changed": int(((r["first"] == 1) != (ref["first"] == 1)).sum()),
            "min_cos_to_fp32": float(cos.min()),
        })  # fmt: skip
    return rows, norm


def synthetic(a: argparse.Namespace, norms: list[float]) -> list[dict]:
    g = torch.Generator().manual_seed(a.seed)
    n_q, n_g, d = a.syn_queries, a.syn_gallery, 2048
    centres = torch.randn(n_g, d, generator=g)  # gallery i < n_q matches query i

    def views(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nuisance = torch.randn(len(rows), d, generator=g)  # shared by both views of an image
        out = []
        for _ in range(2):
            noise = torch.randn(len(rows), d, generator=g)
            # ReLU'd around a common mean, like GAP features; the coefficients put rank-1 near
            # 40 % at 1,000 × 10,000 (a model of the mechanism, not of any trained backbone)
            out.append(F.relu(1.0 + 0.12 * centres[rows] + 0.35 * nuisance + 0.2 * noise))
        return out[0], out[1]

    qv, gv = views(torch.arange(n_q)), views(torch.arange(n_g))
    qid = torch.arange(1, n_q + 1)
    gid = torch.cat([qid, torch.zeros(n_g - n_q, dtype=torch.int64)])
    rows = []
    for target in norms:
        scale = target / float(gv[1].norm(dim=1).mean())
        for fusion in FUSIONS:
            qf = _fused(qv[0] * scale, qv[1] * scale, fusion)
            gf = _fused(gv[0] * scale, gv[1] * scale, fusion)
            r = _scores(qf, qid, gf, gid)
            rows.append(
                {
                    "mean_norm": target,
                    "fusion": fusion,
                    **{k: v for k, v in r.items() if k != "first"},
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--ids", type=int, default=80, help="query identities (one match each)")
    ap.add_argument("--distractors", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--syn-queries", type=int, default=1000)
    ap.add_argument("--syn-gallery", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}"
    )
    print(f"machine: {machine}", flush=True)
    t0 = time.perf_counter()
    print(f"part 1: {a.arch} (random init), {a.ids} queries × {a.ids + a.distractors} gallery")
    real, norm = real_forwards(a)
    print("| features | fusion | rank-1 | mAP (trapezoid, all) | mAP (standard) | vs fp32: "
          "first-hit rank changed / rank-1 hit changed (queries) | min cos to fp32 | ties |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in real:
        moved = f"{r['first_hit_rank_changed']} / {r['rank1_hit_changed']}"
        print(f"| {r['precision']} | {r['fusion']} | {r['rank1']:.2f} | {r['mAP_trapezoid']:.2f} | "
              f"{r['mAP_standard']:.2f} | {moved if r['precision'] != 'fp32' else '–'} | "
              f"{r['min_cos_to_fp32']:.6f} | {r['ties']} |")  # fmt: skip
    print(f"mean raw feature norm ({a.arch}, random init): {norm:.2f}")
    norms = [1.0, 4.0, round(norm, 2)]
    print(f"part 2: synthetic 2048-d, {a.syn_queries} queries × {a.syn_gallery} gallery")
    syn = synthetic(a, norms)
    print("| mean ‖f‖ | fusion | rank-1 | mAP (trapezoid, all) | mAP (standard) |")
    print("|---|---|---|---|---|")
    for r in syn:
        print(f"| {r['mean_norm']:g} | {r['fusion']} | {r['rank1']:.2f} | "
              f"{r['mAP_trapezoid']:.2f} | {r['mAP_standard']:.2f} |")  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.write_text(
            json.dumps({"machine": machine, "real": real, "synthetic": syn}, indent=1)
        )


if __name__ == "__main__":
    main()
