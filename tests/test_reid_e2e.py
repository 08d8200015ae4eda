"""eval-reid end to end: generated Market-style images through the real command (CliRunner)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms
from typer.testing import CliRunner

from sslctl import UserError
from sslctl.backbones import load_backbone
from sslctl.cli.app import app
from sslctl.cli.eval_reid import parse_size
from sslctl.convert.weights import read_backbone
from sslctl.eval.reid import features as rf
from sslctl.eval.reid import pipeline
from sslctl.eval.reid.options import EvalReidOptions
from tests.reid_helpers import make_backbone, make_market, write_image

ROOT = Path(__file__).resolve().parents[1]
# sslctl.api re-exports the function eval_reid under the module's name: fetch the module.
api_mod = importlib.import_module("sslctl.api.eval_reid")
runner = CliRunner()


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("market")
    return make_market(base / "Market"), make_backbone(base / "r18.safetensors")


def _run(*args: str):
    return runner.invoke(app, ["eval-reid", *args, "--workers", "0", "--device", "cpu"])


@pytest.fixture(scope="module")
def first_run(market, tmp_path_factory):
    """One extraction through the command, shared by the tests that only read its outputs."""
    data, weights = market
    out = tmp_path_factory.mktemp("first") / "out"
    r = _run(str(weights), "--data", str(data), "--layout", "market1501", "--out", str(out))
    assert r.exit_code == 0, r.output
    return out, r.output


def _reference_feature(weights: Path, image: Path, fusion: str = "sum") -> torch.Tensor:
    """SPEC §6 written out with torchvision: bicubic 256×128, GAP, image and mirror fused, L2.

    legacy-triplet is the reference script's loop as it reads: ff = 0; for each view
    ff = ff + f, ff = ff / ‖ff‖ (so the image enters normalised, the mirror raw).
    """
    net, _ = load_backbone(read_backbone(weights).state, "test")
    tf = transforms.Compose([
        transforms.Resize((256, 128), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    x = tf(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        if fusion == "sum":
            return F.normalize(net.eval()(x) + net(x.flip(3)), dim=1)[0]
        ff = torch.zeros(1, 512)
        for view in (x, x.flip(3)):
            ff = ff + net.eval()(view)
            ff = ff / ff.norm(p=2, dim=1, keepdim=True)
        return ff[0]


def _make_sysu(root: Path) -> Path:
    """SYSU-30k test tree: 4 query ids with one c1 gallery match each (odd ids a resized look-alike
    of the query, even ids unrelated), 5 ``0000others`` distractors, and a fifth query (28315)
    with no match: invalid, yet counted by ``all``."""
    for pid in range(28311, 28316):
        write_image(root / "query" / f"{pid:09d}" / f"{pid:09d}_c2_2.jpg", seed=pid % 100)
        if pid < 28315:
            seed, size = (pid % 100, (26, 52)) if pid % 2 else (pid % 100 + 50, (24, 48))
            write_image(root / "gallery" / f"{pid:09d}" / f"{pid:09d}_c1_1.jpg", seed, size)
    for i in range(5):
        write_image(root / "gallery" / "0000others" / f"0000others_c1_{i}.jpg", seed=200 + i)
    return root


def _reference_script_metrics(q: rf.FeatureFile, g: rf.FeatureFile) -> tuple[float, float]:
    """Rank-1 and mAP (%) as the reference script computes them: np.dot scores, argsort, its
    compute_mAP (trapezoid) per query, CMC and AP summed and divided by all queries."""
    rank1 = ap = 0.0
    for f, pid in zip(q.features.double().numpy(), q.ids.tolist(), strict=True):
        index = np.argsort(-(g.features.double().numpy() @ f), kind="stable")
        rows_good = np.flatnonzero(g.ids.numpy()[index] == pid)
        if len(rows_good) == 0:  # the script's cmc[0] = -1: skipped, still in the denominator
            continue
        rank1 += rows_good[0] == 0
        for i, row in enumerate(rows_good):
            precision = (i + 1) / (row + 1)
            old_precision = i / row if row != 0 else 1.0
            ap += (old_precision + precision) / 2 / len(rows_good)
    return 100 * rank1 / len(q.ids), 100 * ap / len(q.ids)


def test_command_extracts_caches_and_reuses(market, first_run, monkeypatch):
    data, weights = market
    out, output = first_run
    assert "rank-1" in output and "features extracted: query, gallery" in output
    res = json.loads((out / "results.json").read_text())
    assert res["num_queries"] == res["num_valid_queries"] == 4
    assert res["num_gallery"] == 15 and res["num_gallery_junk"] == 1 and res["num_distractors"] == 2
    assert res["ap_definition"] == "standard" and res["ties"] == "pessimistic"
    # Market-1501 keeps today's defaults, and results.json names every choice
    assert (res["flip"], res["flip_fusion"], res["precision"], res["denominator"]) == (
        True, "sum", "fp32", "valid",
    )  # fmt: skip
    assert res["tf32"] == "off" and res["score_precision"] == "fp32, TF32 off"
    assert res["metric"] == "cosine" and res["compat"] is None and res["cache_dtype"] == "fp32"
    assert 0 <= res["rank1"] <= res["rank5"] <= res["rank10"] <= 100
    assert len(res["cmc"]) == 13  # clamped to the longest junk-free list (15 − 1 − 1)
    assert (out / "cmc.png").is_file() and Image.open(out / "cmc.png").size == (720, 480)

    q = rf.load(out / "features" / "query.safetensors")
    assert q.paths == [f"{i:04d}_c1s1_000{i}01_00.jpg" for i in range(1, 5)]
    assert q.ids.tolist() == [1, 2, 3, 4] and q.cams.tolist() == [1, 1, 1, 1]
    assert len(q.hashes) == 4 and q.meta["flip_fusion"] == "sum"
    ref = _reference_feature(weights, data / "query" / q.paths[2])
    torch.testing.assert_close(q.features[2], ref, atol=2e-5, rtol=0)

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "features").iterdir()}

    def no_extraction(*a, **k):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(pipeline, "extract_features_and_labels", no_extraction)
    second = _run(
        str(weights), "--data", str(data), "--layout", "market1501", "--out", str(out),
        "--ap", "trapezoid",
    )  # fmt: skip
    assert second.exit_code == 0, second.output
    assert "using cached features" in second.output and "using cached ranks" in second.output
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "features").iterdir()}
    res2 = json.loads((out / "results.json").read_text())
    assert res2["ap_definition"] == "trapezoid" and res2["ranks_cached"] is True
    assert res2["rank1"] == res["rank1"] and res2["mAP"] <= res["mAP"]


def test_changed_options_invalidate_the_features_cache(tmp_path, market):
    _, weights = market
    qdir, gdir = tmp_path / "q", tmp_path / "g"
    write_image(qdir / "0001_c1_1.jpg", seed=1)
    write_image(gdir / "0001_c2_1.jpg", seed=2)
    write_image(gdir / "0002_c2_1.jpg", seed=3)
    out = tmp_path / "out"
    base = [str(weights), "--query", str(qdir), "--gallery", str(gdir), "--layout", "market1501"]
    base += ["--out", str(out)]
    assert _run(*base, "--no-flip").exit_code == 0
    r = _run(*base, "--no-flip", "--flip-fusion", "legacy-triplet")  # no flip: fusion moot
    assert "using cached features" in r.output
    r = _run(*base)  # flip on: the cache (flip_fusion=none) does not stand for it
    assert r.exit_code == 0 and "differs in flip_fusion: extracting again" in r.output
    assert rf.load(out / "features" / "gallery.safetensors").meta["flip_fusion"] == "sum"
    r = _run(*base, "--recompute")
    assert "features extracted: query, gallery" in r.output


def _features_file(path: Path, feats, ids, cams) -> Path:
    save_file(
        {"features": torch.as_tensor(feats, dtype=torch.float32),
         "ids": torch.as_tensor(ids), "cameras": torch.as_tensor(cams)},
        str(path),
    )  # fmt: skip
    return path


def test_features_files_path_uses_the_same_metric_code(tmp_path):
    q = _features_file(tmp_path / "q.safetensors", [[1, 0], [0, 1]], [1, 2], [0, 0])
    g = _features_file(
        tmp_path / "g.safetensors", [[2, 0], [1, 1], [0, 3], [1, 0]], [2, 1, 2, 0], [1, 1, 1, 1]
    )
    out = tmp_path / "out"
    r = _run("--query-features", str(q), "--gallery-features", str(g), "--out", str(out))
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    # After L2 normalisation: q1 (id 1) list g0 N 1, g3 N 1, g1 P .71, g2 N 0 -> r = (3,)
    # q2 (id 2) list g2 P 1, g1 N .71, then g0 P 0 tied with g3 N 0 -> pessimistic r = (1, 4)
    assert res["rank1"] == 50.0 and res["num_queries_with_ties"] == 1
    assert res["mAP"] == pytest.approx(100 * (1 / 3 + (1 + 2 / 4) / 2) / 2)
    r = _run("--query-features", str(q), "--gallery-features", str(g), "--out", str(out),
             "--ties", "optimistic")  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["rank1"] == 50.0 and res["mAP"] == pytest.approx(100 * (1 / 3 + (1 + 2 / 3) / 2) / 2)
    assert "using cached ranks" in r.output


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty_query", "query folder .* contains no images"),
        ("bad_name", "cannot parse 'bounding_box_test/foo.jpg': expected <pid>_c<cam>"),
        ("corrupt", "cannot decode image .*0002_c2s1_000999_00.jpg"),
        ("dims", "feature dimensions differ: query .*\\(2, 3\\) vs gallery .*\\(2, 4\\)"),
        ("no_valid", "no query has a valid gallery match \\(2 queries"),
        ("nan", "non-finite feature value in row 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(market, tmp_path, case, message):
    data, weights = market
    args = [str(weights), "--data", str(tmp_path / "m"), "--layout", "market1501"]
    (tmp_path / "m" / "query").mkdir(parents=True)
    write_image(tmp_path / "m" / "bounding_box_test" / "0001_c2s1_000001_00.jpg", seed=1)
    if case == "empty_query":
        (tmp_path / "m" / "query" / "notes.txt").write_text("no images here")
    elif case in ("bad_name", "corrupt"):
        write_image(tmp_path / "m" / "query" / "0001_c1s1_000001_00.jpg", seed=1)
        bad = (
            tmp_path
            / "m"
            / "bounding_box_test"
            / ("foo.jpg" if case == "bad_name" else "0002_c2s1_000999_00.jpg")
        )
        good = (data / "query" / "0001_c1s1_000101_00.jpg").read_bytes()
        bad.write_bytes(good[: len(good) // 3])  # a truncated JPEG
    else:
        d_g = 4 if case == "dims" else 3
        gf = [[1.0] * d_g, [0.0] * (d_g - 1) + [1.0]]
        qf = [[1.0, 0, 0], [0, float("nan") if case == "nan" else 1.0, 0]]
        q = _features_file(tmp_path / "q.safetensors", qf, [1, 2], [0, 0])
        g = _features_file(
            tmp_path / "g.safetensors", gf, [3, 4] if case == "no_valid" else [1, 2], [1, 1]
        )
        args = ["--query-features", str(q), "--gallery-features", str(g)]
    r = _run(*args, "--out", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    err = r.output.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in r.output
    assert re.search(message, err[-1]), err[-1]


@pytest.mark.ddp
def test_nproc_per_node_relaunches_and_matches_one_process(market, first_run, tmp_path):
    """--nproc-per-node 2 (torchrun, gloo): an odd gallery (15) split 7 + 8, gathered in order."""
    data, weights = market
    one, _ = first_run
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sslctl", "eval-reid", str(weights), "--data", str(data),
           "--layout", "market1501", "--out", str(two), "--workers", "0", "--device", "cpu",
           "--nproc-per-node", "2"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for split in ("query", "gallery"):
        a = rf.load(one / "features" / f"{split}.safetensors")
        b = rf.load(two / "features" / f"{split}.safetensors")
        assert a.paths == b.paths and a.hashes == b.hashes
        torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=0)
    res = json.loads((two / "results.json").read_text())
    assert res["num_gallery"] == 15 and res["ap_definition"] == "standard"
    assert "rank-1" in r.stdout and "features extracted: query, gallery" in r.stdout


def test_compat_presets_yield_to_explicit_flags_and_sizes_parse():
    resolve, opts = api_mod._resolve, EvalReidOptions
    o = resolve(opts(compat="triplet-script"))
    assert (o.ap, o.denominator, o.flip_fusion) == ("trapezoid", "all", "legacy-triplet")
    o = resolve(opts(compat="triplet-script", ap="standard"))
    assert (o.ap, o.denominator) == ("standard", "all")
    o = resolve(opts())
    assert (o.ap, o.denominator, o.flip_fusion) == ("standard", "valid", "sum")
    with pytest.raises(UserError, match="--compat must be one of"):
        resolve(opts(compat="matlab"))
    with pytest.raises(UserError, match="--flip-fusion must be one of"):
        resolve(opts(flip_fusion="mean"))
    assert parse_size("1GiB") == 2**30 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("2G") == 2 * 10**9 and parse_size("1000") == 1000
    with pytest.raises(UserError, match="expected a size"):
        parse_size("lots")


def test_layout_picks_the_defaults_and_flags_or_compat_override_them():
    resolve, opts = api_mod._resolve, EvalReidOptions

    def choices(o):
        return (o.flip_fusion, o.precision, o.ap, o.denominator)

    reference = ("legacy-triplet", "fp32", "trapezoid", "all")
    assert choices(resolve(opts(layout="sysu30k"))) == reference
    # "auto" is the layout's default: fp32 for SYSU-30k whatever the device
    assert choices(resolve(opts(layout="sysu30k", precision="auto"))) == reference
    for layout in ("market1501", "imagefolder", None):
        assert choices(resolve(opts(layout=layout))) == ("sum", "auto", "standard", "valid")
    explicit = dict(flip_fusion="sum", precision="bf16", ap="standard", denominator="valid")
    assert choices(resolve(opts(layout="sysu30k", **explicit))) == tuple(explicit.values())
    o = resolve(opts(layout="sysu30k", compat="torchreid"))
    assert choices(o) == ("sum", "fp32", "standard", "valid")
    o = resolve(opts(layout="market1501", compat="triplet-script", precision="fp32"))
    assert choices(o) == reference


def test_sysu30k_defaults_are_the_reference_script_end_to_end(market, tmp_path, monkeypatch):
    _, weights = market
    data, out = _make_sysu(tmp_path / "sysu"), tmp_path / "out"
    base = [str(weights), "--data", str(data), "--layout", "sysu30k", "--out", str(out)]
    seen, extract = [], pipeline.extract_features_and_labels

    def spy(*args, **kwargs):  # the flags the forward runs under
        b = torch.backends
        seen.append(
            (kwargs["precision"], b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision)
        )
        return extract(*args, **kwargs)

    monkeypatch.setattr(pipeline, "extract_features_and_labels", spy)
    r = _run(*base)
    assert r.exit_code == 0, r.output
    assert seen == [("fp32", "ieee", "ieee")] * 2  # query, gallery: no autocast, no TF32
    res = json.loads((out / "results.json").read_text())
    assert (res["flip"], res["flip_fusion"], res["precision"], res["tf32"]) == (
        True, "legacy-triplet", "fp32", "off",
    )  # fmt: skip
    assert (res["ap_definition"], res["denominator"], res["ties"]) == (
        "trapezoid",
        "all",
        "pessimistic",
    )
    assert res["num_queries"] == 5 and res["num_valid_queries"] == 4
    q = rf.load(out / "features" / "query.safetensors")
    g = rf.load(out / "features" / "gallery.safetensors")
    ref = _reference_feature(weights, data / "query" / q.paths[1], "legacy-triplet")
    torch.testing.assert_close(q.features[1], ref, atol=2e-5, rtol=0)
    rank1, m_ap = _reference_script_metrics(q, g)
    assert res["num_queries_with_ties"] == 0  # the script's tie order is then irrelevant
    assert res["rank1"] == pytest.approx(rank1) and res["mAP"] == pytest.approx(m_ap)
    assert 0 < res["rank1"] < res["rank5"] < 100  # hits and misses: both AP terms are exercised

    # Features files carry their layout: the same defaults apply to them.
    feats = ["--query-features", str(out / "features" / "query.safetensors"),
             "--gallery-features", str(out / "features" / "gallery.safetensors")]  # fmt: skip
    r = _run(*feats, "--out", str(tmp_path / "files"))
    assert r.exit_code == 0, r.output
    res_files = json.loads((tmp_path / "files" / "results.json").read_text())
    assert (res_files["ap_definition"], res_files["denominator"]) == ("trapezoid", "all")
    assert res_files["mAP"] == res["mAP"]

    today = ["--flip-fusion", "sum", "--precision", "bf16", "--denominator", "valid",
             "--ap", "standard"]  # fmt: skip
    r = _run(*base, *today)
    assert r.exit_code == 0 and "differs in flip_fusion, precision" in r.output, r.output
    res = json.loads((out / "results.json").read_text())
    assert (res["flip_fusion"], res["precision"], res["ap_definition"], res["denominator"]) == (
        "sum", "bf16", "standard", "valid",
    )  # fmt: skip
