"""Linear evaluation under real DDP on CPU: the command under torchrun with 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslctl import checkpoint
from sslctl.backbones import load_backbone
from sslctl.convert.weights import read_backbone
from sslctl.data.tv import EvalDataset
from sslctl.data.views import linear_val
from sslctl.eval.features import extract_features_and_labels
from sslctl.eval.splits import resolve_splits
from tests.linear_helpers import make_dataset, make_weights, one_torch_thread, tiny_sets, write_png

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["one_torch_thread"]  # an autouse fixture, imported to apply here


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ddp")
    data = make_dataset(base / "data", train=8, val=3)  # 24 train, 9 val images
    write_png(data / "train" / "c1" / "zzz.png", (30, 200, 40), seed=7)  # 25: odd as well
    return data, make_weights(base / "w.safetensors")


def linear_eval(data: Path, weights: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    sets = [a for s in tiny_sets() for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sslctl", "linear-eval", str(weights), "--data", str(data), "--device", "cpu",
           "--profile", "linear-demo-cpu", "--out", str(out), *sets, *extra]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.ddp
def test_cached_features_are_in_dataset_order_without_padding(files, tmp_path):
    data, weights = files
    res = linear_eval(data, weights, tmp_path / "c", "--protocol", "cached", "--compare-random")
    assert res["world_size"] == 2 and res["knn_top1"] == 100.0 and res["top1"] == 100.0
    assert res["random_init"]["top1"] == 100.0  # rank 0 trained both heads; rank 1 waited
    splits = resolve_splits(data)
    net, _ = load_backbone(read_backbone(weights).state, "test")
    for name, samples in (("train", splits.train), ("val", splits.val)):
        ref, ref_labels = extract_features_and_labels(
            net, EvalDataset(samples, linear_val(16, 16)), batch_size=64, device="cpu"
        )
        files_ = sorted((tmp_path / "c" / "cache").glob(f"{name}-*.safetensors"))
        assert len(files_) == 2  # the learned and the random-init backbone
        got = [checkpoint.load_safetensors(f)[0] for f in files_]
        mine = next(g for g in got if torch.allclose(g["features"], ref, atol=1e-5))
        # 25 and 9 rows over 2 ranks: row i is image i, no sampler padding, no duplicates
        assert mine["features"].shape[0] == len(samples) in (25, 9)
        assert mine["labels"].tolist() == ref_labels.tolist() == [y for _, y in samples]


@pytest.mark.ddp
def test_standard_protocol_under_torchrun(files, tmp_path):
    data, weights = files
    res = linear_eval(data, weights, tmp_path / "s")
    assert res["protocol"] == "standard" and res["epochs"] == 2 and res["backbone_unchanged"]
    for h in res["history"]:  # 9 val images, each counted exactly once over the two ranks
        hits = h["top1"] * 9 / 100
        assert abs(hits - round(hits)) < 1e-9
    assert checkpoint.newest_valid(tmp_path / "s" / "checkpoints") is not None


@pytest.mark.ddp
def test_features_are_gathered_to_rank_0_only(tmp_path):
    """Rank 0 gets every row in dataset order; the other ranks hold nothing (a SYSU-30k gallery
    is ≈3.9 GB, which every rank used to receive twice)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.gather_worker", str(tmp_path)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["feats"], torch.arange(21, dtype=torch.float32).view(7, 3))
    assert r0["labels"].tolist() == list(range(7))
    assert r1["feats"].shape == (0, 3) and r1["labels"].numel() == 0
