"""Weighted k-nearest-neighbour classification of frozen features (InstDisc / DINO style).

Each query's k most cosine-similar training features vote for their class with weight
exp(similarity / T); the class scores rank the predictions for top-1/top-5. Similarities are
computed for blocks of ``chunk`` queries at a time, so memory stays at chunk × n_train floats.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sslctl import dist, log
from sslctl.data import bundled
from sslctl.data.readers import MAX_IMAGE_PIXELS, scan_imagefolder
from sslctl.data.views import linear_val
from sslctl.eval.features import auto_precision, labelled_features
from sslctl.eval.splits import check_classes


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores of each query (q×C, fp32): Σ over its k nearest training features of
    exp(cos / T), accumulated per class.

    train_feats: n×d, train_labels: n (int64 in [0, C)), query_feats: q×d; features need not be
    normalised (they are L2-normalised here). k is capped at n.
    """
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(bank.device, torch.int64)
    k = min(k, bank.shape[0])
    out = torch.empty((query_feats.shape[0], num_classes), dtype=torch.float32, device=bank.device)
    for start in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[start : start + chunk].to(bank.device).float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros((q.shape[0], num_classes), dtype=torch.float32, device=bank.device)
        out[start : start + chunk] = votes.scatter_add_(1, labels[idx], weights)
    return out


def correct_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits] of a batch (float64; top-5 = top-C for fewer than 5 classes)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).double()


def percent_correct(counts: torch.Tensor, n: float) -> dict[str, float]:
    """``correct_counts`` summed over ``n`` samples as top1 / top5 in percent."""
    n = max(n, 1)
    return {"top1": 100.0 * float(counts[0]) / n, "top5": 100.0 * float(counts[1]) / n}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1 / top5 in percent (top5 = top-C when there are fewer than 5 classes)."""
    hits = correct_counts(scores, labels.to(scores.device, torch.int64))
    return percent_correct(hits, labels.shape[0])


def knn_accuracy(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted-kNN top1 / top5 (percent) of the (features, labels) of ``val`` against those of
    ``train`` (the bank); see ``knn_scores``."""
    scores = knn_scores(*train, val[0], num_classes, k, temperature, chunk)
    return topk_accuracy(scores, val[1])


def knn_monitor(
    backbone: nn.Module,
    train_root: str | Path,
    val_root: str | Path,
    k: int,
    temperature: float,
    device: torch.device | str,
    batch_size: int,
    image_size: int = 224,
    resize: int | None = None,
    workers: int = 0,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> dict[str, float]:
    """kNN top-1/top-5 of ``backbone`` on two labelled ImageFolder trees, for periodic monitoring.

    Call it on every rank under DDP (extraction is sharded, gathered to rank 0, scored there,
    and the result broadcast): every rank gets the same result. The backbone is deep-copied and
    the copy put in eval mode, so the trained module, its BN statistics, training mode and
    memory format are untouched. Images go through
    the linear-evaluation validation transform (resize ``resize`` — default image_size·256/224 —
    then centre-crop ``image_size``). ``"bundled"`` as a root means the demo set's split.
    Returns ``{"knn_top1": …, "knn_top5": …}`` in percent.
    """
    train_root, val_root = bundled.resolve(train_root, "train"), bundled.resolve(val_root, "val")
    train, classes_t = scan_imagefolder(train_root)
    val, classes_v = scan_imagefolder(val_root)
    n = check_classes(train, val, classes_t, classes_v, str(train_root), str(val_root))
    spec = linear_val(image_size, resize or round(image_size * 256 / 224))
    model = copy.deepcopy(backbone).eval()
    dev = torch.device(device)
    precision = auto_precision(dev)
    feats = {}
    for name, samples in (("train", train), ("val", val)):
        feats[name] = labelled_features(
            model, samples, spec, max_image_pixels, batch_size=batch_size, device=dev,
            precision=precision, normalize=True, workers=workers, progress_desc=f"kNN {name}",
            worker_start="forkserver",  # called mid-training, where DALI's threads run: never fork
        )  # fmt: skip
    del model
    res: dict[str, float] = {}
    if dist.is_main():  # the features were gathered to rank 0 only
        bank = feats["train"]
        accuracy = knn_accuracy((bank[0].to(dev), bank[1]), feats["val"], n, k, temperature)
        log.info(f"kNN monitor (k={k}, T={temperature}): top-1 {accuracy['top1']:.2f}%")
        res = {"knn_top1": accuracy["top1"], "knn_top5": accuracy["top5"]}
    return dist.broadcast_object(res)  # type: ignore[return-value]
