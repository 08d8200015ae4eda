from pathlib import Path

import pytest

from sslctl import UserError, config


def test_every_bundled_profile_loads_with_required_keys():
    names = config.list_profiles()
    assert {
        "r50-3090x8",
        "r50-3090x8-ep200",
        "r50-12gx8",
        "r50-sysu30k",
        "demo-cpu",
        "byol-r50-3090x8",
    } <= set(names)
    for n in names:
        cfg = config.load(n)
        assert cfg.train.epochs >= 1 and cfg.train.batch_size >= 1 and cfg.train.accumulate >= 1
        assert cfg.optim.lr > 0 and cfg.data.backend in ("auto", "torchvision", "dali")
        assert names[n], f"profile {n} has no description"


def test_reference_profile_matches_spec():
    c = config.load("r50-3090x8")
    assert (c.train.batch_size, c.train.accumulate, c.train.epochs) == (196, 4, 1000)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.trust_coef, c.optim.warmup_epochs) == (
        4.8,
        1e-6,
        0.001,
        10,
    )
    assert (c.loss.gamma, c.loss.margin, c.loss.drop_nearest, c.loss.keep) == (2.0, 100.0, 1, 9)
    assert c.method.base_momentum == 0.99 and c.train.precision == "fp16"
    assert (c.method.online_res_min, c.method.target_res_min) == (96, 128)
    assert (
        config.load("r50-12gx8").train.batch_size * config.load("r50-12gx8").train.accumulate * 8
        == 4992
    )
    s = config.load("r50-sysu30k")
    assert (s.train.epochs, s.optim.warmup_epochs, s.ckpt.every_epochs, s.train.accumulate) == (
        10,
        2,
        1,
        8,
    )


def test_set_overrides_and_types():
    c = config.load("demo-cpu", ["optim.lr=2.4", "train.epochs=200", "loss.gather_negatives=true"])
    assert c.optim.lr == 2.4 and c.train.epochs == 200 and c.loss.gather_negatives is True
    c = config.load("demo-cpu", ["optim.lr=3"])  # int accepted where a float is expected
    assert isinstance(c.optim.lr, float)


def test_unknown_key_in_file_names_file(tmp_path: Path):
    p = tmp_path / "mine.yaml"
    p.write_text("train:\n  epochs: 3\n  batchsize: 4\n")
    with pytest.raises(UserError) as e:
        config.load(str(p))
    assert "mine.yaml" in str(e.value) and "train.batchsize" in str(e.value)


def test_unknown_profile_suggests_close_names_and_the_list_command():
    with pytest.raises(UserError) as e:
        config.load("r50-3090x9")
    assert "unknown profile 'r50-3090x9' (did you mean r50-3090x8" in str(e.value)
    with pytest.raises(UserError) as e:
        config.load("zzz")
    assert "unknown profile 'zzz' (`sslctl profiles` lists the bundled ones" in str(e.value)


def test_config_json_round_trip():
    c = config.load("r50-sysu30k")
    assert config.from_json(c.to_json()) == c


def test_byol_profile_may_use_small_batch():
    # The 11-sample minimum is the triplet loss's; BYOL has no such constraint.
    c = config.load("byol-r50-3090x8", ["train.batch_size=4"])
    assert c.train.batch_size == 4
