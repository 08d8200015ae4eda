"""eval.knn_every through the real pretrain path: kNN records land in metrics.jsonl."""

from __future__ import annotations

import pytest

from sslctl import UserError, api
from sslctl.log import read_jsonl
from tests.fault_helpers import make_images, write_profile


def test_pretrain_logs_knn_monitor(tmp_path):
    data = make_images(tmp_path / "train", n=36)
    val = make_images(tmp_path / "val", n=12)
    prof = write_profile(
        tmp_path / "p.yaml",
        f"eval: {{knn_every: 1, knn_train: {data}, knn_val: {val}, knn_k: 5}}\n",
    )
    prof.write_text(
        prof.read_text()
        .replace("epochs: 3", "epochs: 1")
        .replace("every_steps: 1", "every_steps: 0")
    )
    api.pretrain(str(prof), tmp_path / "run", data)
    recs = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "knn_top1" in r]
    assert (
        len(recs) == 1
        and 0.0 <= recs[0]["knn_top1"] <= 100.0
        and recs[0]["knn_top5"] >= recs[0]["knn_top1"]
    )


def test_knn_monitor_needs_its_folders(tmp_path):
    data = make_images(tmp_path / "train", n=36)
    prof = write_profile(tmp_path / "p.yaml", "eval: {knn_every: 1}\n")
    with pytest.raises(UserError, match="eval.knn_train and eval.knn_val"):  # config or api check
        api.pretrain(str(prof), tmp_path / "run", data)
