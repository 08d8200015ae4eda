"""eval.knn_every through the real pretrain path: kNN records land in metrics.jsonl."""

from __future__ import annotations

import pytest

from sslctl import UserError, api
from sslctl.log import read_jsonl


@pytest.mark.slow
def test_pretrain_logs_knn_monitor(tmp_path, shared_images, tiny_profile):
    data, val = shared_images(n=36), shared_images(n=12)
    prof = tiny_profile(f"eval: {{knn_every: 1, knn_train: {data}, knn_val: {val}, knn_k: 5}}\n")
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


def test_knn_monitor_needs_its_folders(tmp_path, shared_images, tiny_profile):
    prof = tiny_profile("eval: {knn_every: 1}\n")
    with pytest.raises(UserError, match="eval.knn_train and eval.knn_val"):  # config or api check
        api.pretrain(str(prof), tmp_path / "run", shared_images(n=36))
