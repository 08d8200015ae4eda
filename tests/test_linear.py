"""Linear evaluation: frozen backbone, head-only optimisation, resume, cached probe, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sslctl import checkpoint, config, dist
from sslctl.backbones import build_backbone
from sslctl.cli.app import app
from sslctl.eval.cached_probe import fits_in_half_free, place_features, train_cached_head
from sslctl.eval.linear import StandardProbe
from sslctl.eval.splits import resolve_splits
from sslctl.log import read_jsonl
from tests.linear_helpers import (
    make_dataset,
    make_split,
    make_weights,
    one_torch_thread,
    separable,
    tiny_sets,
)

runner = CliRunner()
__all__ = ["one_torch_thread"]  # an autouse fixture, imported to apply here
CPU = dist.DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("lin")
    return make_dataset(base / "data"), make_weights(base / "r18.safetensors")


def _cli(*args: str, sets: list[str] | None = None):
    extra = [a for s in (sets or tiny_sets()) for a in ("--set", s)]
    return runner.invoke(app, [*args, "--profile", "linear-demo-cpu", "--device", "cpu", *extra])


def _head(run: Path) -> torch.Tensor:
    return checkpoint.load_safetensors(checkpoint.resolve(run).weights)[0]["head.weight"]


def test_only_the_head_trains_and_the_backbone_stays_bit_identical(files, tmp_path):
    data, _ = files
    cfg = config.load_linear("linear-demo-cpu", tiny_sets())
    torch.manual_seed(0)
    net = build_backbone("resnet18", small_stem=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    probe = StandardProbe(cfg, net, resolve_splits(data), tmp_path, CPU, {"arch": "resnet18"})
    in_opt = {id(p) for g in probe.opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in probe.head.parameters()}
    head_before = probe.head.weight.detach().clone()
    r = probe.run()
    assert r.stopped == "done" and r.epochs == 2 and r.backbone_unchanged
    assert not torch.equal(probe.head.weight, head_before)  # the head did learn
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():  # weights and BN buffers (running stats, counters)
        assert torch.equal(v, before[k]), k


def test_cached_probe_separates_separable_features():
    cfg = config.load_linear("linear-demo-cpu", ["cached.epochs=20", "cached.batch_size=32"])
    tx, ty = separable(40, 5, dim=32)
    vx, vy = separable(10, 5, dim=32, seed=3)
    r = train_cached_head((tx * 1e3, ty), (vx * 1e3, vy), 5, cfg.cached, torch.device("cpu"))
    assert r.top1 == 100.0 and r.best_top1 == 100.0 and len(r.history) == 20


def test_standard_run_end_to_end(files, tmp_path):
    data, weights = files
    out = tmp_path / "run"
    r = _cli("linear-eval", str(weights), "--data", str(data), "--out", str(out))
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "standard" and res["epochs"] == 2 and res["num_classes"] == 3
    assert {"top1", "top5", "best_top1"} <= res.keys() and res["backbone_unchanged"] is True
    assert res["top1"] == res["history"][-1]["top1"] and res["top5"] == 100.0
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 7))
    assert [r["epoch"] for r in recs if "top1" in r] == [1.0, 2.0]
    assert "bit-identical" in r.output


def test_resume_continues_where_it_stopped(files, tmp_path, monkeypatch):
    data, weights = files
    straight, stopped = tmp_path / "a", tmp_path / "b"
    assert (
        _cli("linear-eval", str(weights), "--data", str(data), "--out", str(straight)).exit_code
        == 0
    )
    calls = {"n": 0}

    def agreed(self) -> bool:  # a stop signal arrives during step 4 (epoch 2, batch 1 of 3)
        calls["n"] += 1
        return calls["n"] == 4

    monkeypatch.setattr("sslctl.engine.preempt.StopFlag.agreed", agreed)
    first = _cli("linear-eval", str(weights), "--data", str(data), "--out", str(stopped))
    assert first.exit_code == 3, first.output
    assert checkpoint.newest_valid(stopped / "checkpoints").step == 4
    monkeypatch.undo()
    second = _cli("linear-eval", str(weights), "--data", str(data), "--out", str(stopped))
    assert second.exit_code == 0, second.output
    assert "resumed linear evaluation" in second.output
    assert torch.equal(_head(straight), _head(stopped))  # same views, same steps: same head
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((stopped / "results.json").read_text())
    assert a["top1"] == b["top1"] and [h["top1"] for h in a["history"]] == [
        h["top1"] for h in b["history"]
    ]
    steps = [r["step"] for r in read_jsonl(stopped / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 7))  # continued at step 5, nothing trained twice


def test_cached_protocol_compares_random_and_reuses_features(files, tmp_path):
    data, weights = files
    out = tmp_path / "c"
    args = ["linear-eval", str(weights), "--data", str(data), "--out", str(out)]
    r = _cli(*args, "--protocol", "cached", "--compare-random")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "cached" and res["features_from_cache"] is False
    assert res["top1"] == 100.0 and res["knn_top1"] == 100.0  # colours separate the classes
    assert {"top1", "knn_top1", "backbone_unchanged"} <= res["random_init"].keys()
    assert "random init" in r.output and "fast proxy" in r.output
    again = _cli(*args, "--protocol", "cached")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "results.json").read_text())["features_from_cache"] is True
    knn = _cli("knn-eval", str(weights), "--data", str(data), "--out", str(tmp_path / "k"),
               "--cache-dir", str(out / "cache"), "--k", "3")  # fmt: skip
    assert knn.exit_code == 0, knn.output
    kres = json.loads((tmp_path / "k" / "results.json").read_text())
    assert kres["k"] == 3 and kres["features_from_cache"] is True and kres["top1"] == 100.0


def _one_line_error(r, fragment: str) -> None:
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], r.output
    assert "Traceback" not in r.output


def test_missing_val_set(files, tmp_path):
    _, weights = files
    root = tmp_path / "noval"
    make_split(root / "train", 2)
    r = _cli("linear-eval", str(weights), "--data", str(root), "--out", str(tmp_path / "o"))
    _one_line_error(r, "no val/ folder inside")


def test_class_mismatch(files, tmp_path):
    _, weights = files
    root = tmp_path / "mismatch"
    make_split(root / "train", 2, classes=3)
    make_split(root / "val", 2, classes=2)
    r = _cli("knn-eval", str(weights), "--data", str(root), "--out", str(tmp_path / "o"))
    _one_line_error(r, "class mismatch between train")


def test_list_file_labels_outside_train(files, tmp_path):
    data, weights = files
    (tmp_path / "train.txt").write_text("train/c0/000.png 0\ntrain/c1/000.png 1\n")
    (tmp_path / "val.txt").write_text("val/c0/000.png 0\nval/c2/000.png 2\n")
    r = _cli("linear-eval", str(weights), "--data", str(data), "--train",
             str(tmp_path / "train.txt"), "--val", str(tmp_path / "val.txt"),
             "--out", str(tmp_path / "o"))  # fmt: skip
    _one_line_error(r, "val labels [2] are not train classes")


def test_weights_of_another_architecture(files, tmp_path):
    data, _ = files
    vgg_like = tmp_path / "vgg.safetensors"
    checkpoint.save_safetensors(vgg_like, {"features.0.weight": torch.zeros(8, 3, 3, 3)}, {})
    r = _cli("linear-eval", str(vgg_like), "--data", str(data), "--out", str(tmp_path / "o"))
    _one_line_error(r, "no backbone found")


def test_resume_refuses_a_run_of_other_weights(files, tmp_path):
    data, weights = files
    out = tmp_path / "r"
    assert _cli("linear-eval", str(weights), "--data", str(data), "--out", str(out)).exit_code == 0
    other = make_weights(tmp_path / "other.safetensors", seed=2)
    r = _cli("linear-eval", str(other), "--data", str(data), "--out", str(out))
    _one_line_error(r, "holds a linear evaluation of other weights")


def test_cached_features_and_labels_land_on_one_device() -> None:
    """The cached probe once moved labels to the features' *old* device (CPU) while the
    features went to the GPU, so ``ty[idx]`` raised on CUDA. ``meta`` stands in for the GPU."""
    feats, labels = torch.randn(6, 4), torch.arange(6, dtype=torch.int32)
    meta = torch.device("meta")
    f, y = place_features(feats, labels, meta, fits=lambda t, d: True)
    assert f.device == y.device == meta and y.dtype == torch.int64
    f, y = place_features(feats, labels, meta, fits=lambda t, d: False)  # too big: stay put
    assert f.device == y.device == torch.device("cpu")
    assert not fits_in_half_free(feats, torch.device("cpu"))
