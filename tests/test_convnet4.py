"""convnet4 (the CPU demo's backbone) and the AdamW optimiser, through the real code paths:
pretrain on image files → checkpoint → extract (.safetensors and .pth) → linear-eval with a
random-init baseline; convert-detectron refuses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sslctl import UserError, api, checkpoint, config
from sslctl.backbones import ConvNet4, build_backbone, feature_dim, infer_arch, load_backbone
from sslctl.cli.app import app
from sslctl.convert.weights import read_backbone
from sslctl.engine.recipe import build_optimizer
from sslctl.methods import build_method
from tests.linear_helpers import make_dataset, tiny_sets

# demo-cpu itself (convnet4, AdamW, γ = 1), made small enough for seconds.
SMALL = [
    "model.proj_hidden=32",
    "model.proj_dim=16",
    "model.pred_hidden=32",
    "train.batch_size=12",
    "train.epochs=2",
    "train.log_every=1",
    "data.image_size=16",
    "data.workers=0",
    "eval.knn_every=0",
    "ckpt.every_epochs=1",
]


def test_convnet4_shapes_keys_and_arch_inference():
    torch.manual_seed(0)
    net = build_backbone("convnet4")
    assert isinstance(net, ConvNet4) and feature_dim("convnet4") == 256
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 256)
    assert net(torch.randn(2, 3, 17, 23)).shape == (2, 256)  # any size >= 8 pools to one vector
    state = net.state_dict()
    assert list(state)[:2] == ["stage1.conv.weight", "stage1.bn.weight"]
    assert not any(k.startswith(("fc.", "conv1.")) for k in state)
    assert infer_arch(state) == ("convnet4", False)
    again, arch = load_backbone(state, "test")
    assert arch == "convnet4"
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_convnet4_bad_layouts_and_settings_are_user_errors():
    state = build_backbone("convnet4").state_dict()
    wide = dict(state, **{"stage2.conv.weight": torch.zeros(96, 32, 3, 3)})
    with pytest.raises(UserError, match=r"stage widths \(32, 96, 128, 256\)"):
        infer_arch(wide)
    no_stage3 = {k: v for k, v in state.items() if not k.startswith("stage3.")}
    with pytest.raises(UserError, match="not a complete convnet4 backbone: stage3.conv.weight"):
        infer_arch(no_stage3)
    partial = {k: v for k, v in state.items() if not k.startswith("stage4.bn.")}
    with pytest.raises(UserError, match="test: weights do not fit convnet4: missing"):
        load_backbone(partial, "test")
    with pytest.raises(UserError, match="small_stem applies to ResNets only"):
        build_backbone("convnet4", small_stem=True)
    with pytest.raises(UserError, match="small_stem applies to ResNets only"):
        config.load("demo-cpu", ["model.small_stem=true"])
    tiny = ["method.multires=true", "method.online_res_min=4"]
    with pytest.raises(UserError, match="online_res_min and method.target_res_min must be >= 8"):
        config.load("demo-cpu", tiny)
    assert config.load("demo-cpu", [*tiny, "model.arch=resnet18"]).method.online_res_min == 4


def test_adamw_groups_skip_decay_on_bn_and_bias():
    cfg = config.load("demo-cpu", SMALL)
    assert (cfg.model.arch, cfg.optim.name, cfg.loss.gamma) == ("convnet4", "adamw", 1.0)
    online = build_method(cfg).online
    opt = build_optimizer(cfg, online)
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay) == sum(1 for p in online.parameters() if p.requires_grad)
    for name, p in online.named_parameters():
        assert decay[id(p)] == (0.0 if p.ndim <= 1 else cfg.optim.weight_decay), name
    assert all(g["betas"] == (cfg.optim.momentum, 0.999) for g in opt.param_groups)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, Path]:
    """demo-cpu (made small) trained for 2 epochs on real PNG files."""
    base = tmp_path_factory.mktemp("convnet4")
    data = make_dataset(base / "data", train=8, val=3, classes=3)  # 24 train, 9 val images
    res = api.pretrain("demo-cpu", base / "run", data / "train", SMALL, fresh=True)
    assert res.fit.step == 4 and res.fit.checkpoint is not None  # 24 images / 12 per step × 2
    return data, base / "run"


def test_pretrain_trains_convnet4_with_adamw(demo_run):
    _, run = demo_run
    online = read_backbone(run, "online")
    target = read_backbone(run, "target")
    assert infer_arch(online.state) == ("convnet4", False)
    init = build_backbone("convnet4")
    # AdamW moved the online convolutions; the EMA target (momentum ≈ 0.99) lags behind them
    assert all(
        not torch.equal(online.state[k], target.state[k]) for k in online.state if "conv" in k
    )
    assert online.state.keys() == init.state_dict().keys()
    state = checkpoint.load_train_state(checkpoint.resolve(run).state)["optimizer"]["state"]
    assert state and all({"exp_avg", "exp_avg_sq"} <= s.keys() for s in state.values())  # AdamW's


def test_extract_both_formats_and_read_back(demo_run, tmp_path):
    _, run = demo_run
    runner = CliRunner()
    st = runner.invoke(app, ["extract", str(run), "-o", str(tmp_path / "bb.safetensors")])
    assert st.exit_code == 0, st.output
    flat = " ".join(st.output.split())
    assert "convnet4 online backbone" in flat
    assert "checked: sslctl.backbones.ConvNet4() loads it with nothing missing" in flat
    pth = api.extract(run, tmp_path / "bb.pth")
    assert pth.arch == "convnet4" and pth.missing_in_torchvision == ()
    a = read_backbone(tmp_path / "bb.safetensors").state
    b = read_backbone(tmp_path / "bb.pth").state  # a plain state dict with convnet4's keys
    source = read_backbone(run).state
    assert a.keys() == b.keys() == source.keys()
    assert all(torch.equal(a[k], source[k]) and torch.equal(b[k], source[k]) for k in a)


def test_linear_eval_runs_on_convnet4_with_a_random_init_baseline(demo_run, tmp_path):
    data, run = demo_run
    sets = tuple(tiny_sets("linear.epochs=1"))
    res = api.linear_eval(
        run, data=str(data), profile="linear-demo-cpu", out=tmp_path / "ev",
        protocol="cached", sets=sets, compare_random=True, device="cpu",
    ).results  # fmt: skip
    assert res["arch"] == "convnet4" and res["backbone_unchanged"] is True
    assert res["random_init"]["backbone_unchanged"] is True
    assert len(res["history"]) == len(res["random_init"]["history"]) == 30  # cached.epochs
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["arch"] == "convnet4" and saved["random_init"] == res["random_init"]


def test_convert_detectron_refuses_convnet4(demo_run, tmp_path):
    _, run = demo_run
    with pytest.raises(UserError, match="a convnet4 backbone .* only resnet18, resnet34"):
        api.convert_detectron(run, tmp_path / "o.pkl")
    r = CliRunner().invoke(app, ["convert-detectron", str(run), "-o", str(tmp_path / "o.pkl")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) <= 2  # one (wrapped) line
    assert not list(tmp_path.iterdir())
