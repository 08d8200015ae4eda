"""Run under torchrun by tests/test_linear_ddp.py: sharded feature extraction on 2 gloo ranks;
each rank saves what it received."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from sslctl import dist
from sslctl.eval.features import extract_features_and_labels


def main() -> None:
    out = Path(sys.argv[1])
    di = dist.init("cpu")
    x = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)  # 7 items: shards of 3 and 4
    data = TensorDataset(x, torch.arange(7), torch.arange(7))  # (input, label, index)
    feats, labels = extract_features_and_labels(
        nn.Identity(), data, batch_size=2, device="cpu", progress_desc="gather test"
    )
    torch.save({"feats": feats, "labels": labels}, out / f"rank{di.rank}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main()
