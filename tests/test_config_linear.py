"""Linear-eval profiles: the same strict loader as pre-training, and kinds kept apart."""

from pathlib import Path

import pytest

from sslctl import UserError, config


def test_bundled_linear_profiles_match_spec():
    long, short = config.load_linear("linear-r50"), config.load_linear("linear-r50-short")
    for c in (long, short):
        lin = c.linear
        assert (lin.epochs, lin.batch_size, lin.momentum, lin.weight_decay) == (100, 256, 0.9, 0.0)
        assert (lin.warmup_epochs, lin.warmup_start_factor, lin.final_lr_factor) == (10, 1e-4, 0)
        assert (c.data.image_size, c.data.resize) == (224, 256)
        assert c.kind == "linear-eval"
    assert (long.linear.lr, short.linear.lr) == (0.04, 0.15)
    demo = config.load_linear("linear-demo-cpu")
    assert demo.linear.precision == "fp32" and demo.data.image_size <= 48


def test_kinds_are_listed_and_kept_apart():
    table = config.profile_table()
    assert table["linear-r50"][0] == "linear-eval" and table["demo-cpu"][0] == "pretrain"
    assert all(desc for _, desc in table.values())
    assert "linear-r50" not in config.list_profiles()  # pre-training profiles by default
    assert set(config.list_profiles("linear-eval")) >= {"linear-r50", "linear-r50-short"}
    with pytest.raises(UserError, match="linear-r50.yaml: a linear-eval profile"):
        config.load("linear-r50")
    with pytest.raises(UserError, match="demo-cpu.yaml: a pretrain profile.*not a linear-eval"):
        config.load_linear("demo-cpu")


def test_sets_override_and_convert():
    c = config.load_linear("linear-r50", ["linear.lr=1", "knn.k=10", "data.workers=0"])
    assert c.linear.lr == 1.0 and isinstance(c.linear.lr, float) and c.knn.k == 10
    assert c.data.workers == 0


def test_user_file_errors_name_the_file(tmp_path: Path):
    p = tmp_path / "mine.yaml"
    p.write_text("kind: linear-eval\nlinear:\n  epochs: 3\n  batchsize: 4\n")
    with pytest.raises(UserError) as e:
        config.load_linear(str(p))
    assert "mine.yaml" in str(e.value) and "linear.batchsize" in str(e.value)
    p.write_text("kind: finetune\n")
    with pytest.raises(UserError, match="key 'kind' must be one of pretrain, linear-eval"):
        config.load_linear(str(p))
    p.write_text("kind: linear-eval\nlinear: {epochs: 3, warmup_epochs: 1}\n")
    assert config.load_linear(str(p)).linear.epochs == 3
    with pytest.raises(UserError, match="'kind' is not a settable section"):
        config.load_linear(str(p), ["kind.x=1"])


def test_explicit_pretrain_kind_still_loads(tmp_path: Path):
    p = tmp_path / "pre.yaml"
    p.write_text("kind: pretrain\nextends: demo-cpu\ntrain: {epochs: 3}\n")
    assert config.load(str(p)).train.epochs == 3


def test_knn_monitor_needs_its_folders():
    with pytest.raises(UserError, match="eval.knn_every needs eval.knn_train and eval.knn_val"):
        config.load("demo-cpu", ["eval.knn_every=1", "eval.knn_train=", "eval.knn_val="])
    c = config.load("demo-cpu", ["eval.knn_every=1", "eval.knn_train=a", "eval.knn_val=b"])
    assert c.eval.knn_every == 1
    demo = config.load("demo-cpu").eval  # the demo monitors kNN on the bundled set
    assert (demo.knn_every, demo.knn_train, demo.knn_val) == (2, "bundled", "bundled")
