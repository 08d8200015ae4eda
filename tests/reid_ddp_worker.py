"""Run under torchrun by tests/test_reid_layouts.py: generic extraction on 2 gloo ranks.

argv: OUT WEIGHTS IMAGE… — extracts every prefix case below and writes rank{r}.pt with the
features and labels gathered to rank 0 (empty elsewhere), and the error message (if any) of the
corrupt-file case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sslctl import UserError, dist
from sslctl.backbones import load_backbone
from sslctl.convert.weights import read_backbone
from sslctl.eval.features import extract_features_and_labels
from sslctl.eval.reid.layouts import ReidImages


def main() -> None:
    out, weights, images = Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
    di = dist.init("cpu")
    model, _ = load_backbone(read_backbone(weights).state, str(weights))
    result: dict[str, object] = {}
    # all but the last image (odd count), then a single image (rank 0's shard is empty)
    for name, paths in (("odd", images[:-1]), ("single", images[:1])):
        feats, labels = extract_features_and_labels(
            model, ReidImages(paths), batch_size=2, device=di.device, flip=True, normalize=True
        )
        result[name] = (feats, labels)
    try:  # the last image is corrupt and lies in rank 1's shard: both ranks must stop
        extract_features_and_labels(model, ReidImages(images), batch_size=2, device=di.device)
        result["error"] = ""
    except UserError as e:
        result["error"] = str(e)
    torch.save(result, out / f"rank{di.rank}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main()
