"""Weighted kNN: the vote formula, separable data, chunking, and the pre-training monitor."""

from __future__ import annotations

import math

import pytest
import torch

from sslctl.backbones import build_backbone
from sslctl.eval.knn import knn_accuracy, knn_monitor, knn_scores, topk_accuracy
from tests.linear_helpers import make_dataset, separable


def test_votes_follow_the_formula():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[2.0, 0.0]])  # unnormalised on purpose: cosine similarity is used
    s = knn_scores(bank, labels, q, num_classes=3, k=3, temperature=0.5)
    # neighbours: sim 1.0 (class 0), 0.8 (class 1), 0.0 (class 1); the sim −1 one is not in k=3
    expected = torch.tensor([[math.exp(1 / 0.5), math.exp(0.8 / 0.5) + math.exp(0.0), 0.0]])
    assert torch.allclose(s, expected, rtol=1e-5)


def test_separable_features_give_100_percent_and_chunks_agree():
    tx, ty = separable(30, 5)
    vx, vy = separable(10, 5, seed=1)
    acc = knn_accuracy((tx, ty), (vx, vy), num_classes=5, k=20, temperature=0.07, chunk=7)
    assert acc == {"top1": 100.0, "top5": 100.0}
    whole = knn_scores(tx, ty, vx, 5, k=20, chunk=1000)
    assert torch.allclose(knn_scores(tx, ty, vx, 5, k=20, chunk=3), whole)


def test_top5_counts_any_of_the_best_five():
    scores = torch.tensor([[9.0, 8, 7, 6, 5, 4], [9.0, 8, 7, 6, 5, 4], [1.0, 2, 3, 4, 5, 6]])
    acc = topk_accuracy(scores, torch.tensor([0, 4, 5]))
    assert acc["top1"] == pytest.approx(200 / 3) and acc["top5"] == 100.0
    # fewer than five classes: top-5 is top-C, always 100 %
    assert topk_accuracy(torch.rand(4, 2), torch.tensor([0, 1, 0, 1]))["top5"] == 100.0


def test_k_larger_than_the_bank_is_capped():
    tx, ty = separable(2, 2)
    assert knn_scores(tx, ty, tx, 2, k=50).shape == (4, 2)


def test_monitor_leaves_the_trained_backbone_untouched(tmp_path):
    root = make_dataset(tmp_path / "d", train=6, val=2)
    torch.manual_seed(0)
    net = build_backbone("resnet18", small_stem=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = knn_monitor(net, root / "train", root / "val", 5, 0.07, "cpu", 8, image_size=16)
    assert set(out) == {"knn_top1", "knn_top5"}
    assert out["knn_top1"] == 100.0  # one colour per class: even random features separate them
    assert net.training  # still in training mode, BN statistics untouched
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow
def test_monitor_workers_start_by_forkserver_not_fork(tmp_path, monkeypatch):
    """The monitor runs inside training, where DALI's threads may run: its DataLoader workers
    must not be forked from that process. Same result as without workers."""
    import torch.utils.data as tud

    root = make_dataset(tmp_path / "d", train=6, val=2)
    torch.manual_seed(0)
    net = build_backbone("resnet18", small_stem=True)
    contexts = []
    real = tud.DataLoader.__init__

    def recording(self, *a, **k):
        contexts.append(k.get("multiprocessing_context"))
        real(self, *a, **k)

    monkeypatch.setattr(tud.DataLoader, "__init__", recording)
    with_workers = knn_monitor(net, root / "train", root / "val", 5, 0.07, "cpu", 8, 16, workers=1)
    assert contexts == ["forkserver", "forkserver"]
    alone = knn_monitor(net, root / "train", root / "val", 5, 0.07, "cpu", 8, 16, workers=0)
    assert with_workers == alone
