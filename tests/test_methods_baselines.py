"""SimCLR, MoCo v2 and SimSiam on the shared engine: wiring, MoCo's queue and shuffle-BN,
SimSiam's fixed predictor lr, exact resume, and their checkpoints through extract/kNN."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslctl import api, checkpoint, config, dist
from sslctl.backbones import ConvNet4
from sslctl.engine.fit import FitRequest, Trainer
from sslctl.engine.recipe import build_optimizer, lr_schedule
from sslctl.engine.schedules import WarmupCosine
from sslctl.log import read_jsonl
from sslctl.methods import build_method
from sslctl.methods.mocov2 import MoCoV2, SplitBatchNorm2d, shuffled_forward
from sslctl.rundir import config_changes
from tests.engine_helpers import TensorLoader

ROOT = Path(__file__).resolve().parents[1]
CPU = dist.DistInfo(0, 1, 0, torch.device("cpu"))
TINY = ["train.epochs=2", "train.batch_size=16", "eval.knn_every=0", "train.log_every=1"]


def tiny(method: str, *extra: str) -> config.Config:
    return config.load(f"demo-cpu-{method}", [*TINY, *extra])


def trainer(tmp: Path, cfg: config.Config, max_steps: int | None = None, resume: str = "auto"):
    torch.manual_seed(0)
    loader = TensorLoader(64, cfg.train.batch_size, size=32)
    return Trainer(FitRequest(cfg, tmp, loader, resume, max_steps), CPU)


@pytest.mark.parametrize(
    ("method", "parts", "stats"),
    [
        ("simclr", {"online"}, {"feat_std", "pos_sim"}),
        ("mocov2", {"online", "target", "queue", "queue_ptr"}, {"feat_std", "pos_sim"}),
        ("simsiam", {"online", "predictor"}, {"feat_std"}),
    ],
)
def test_each_method_trains_and_checkpoints_its_own_parts(tmp_path, method, parts, stats):
    t = trainer(tmp_path, tiny(method))
    res = t.run()
    assert res.stopped == "done" and res.step == 8
    w, meta = checkpoint.load_safetensors(checkpoint.resolve(tmp_path).weights)
    assert {k.split(".")[0] for k in w} == parts
    assert meta["method"] == method
    # the backbone keys are the same for every method
    assert {k[len("online.backbone.") :] for k in w if k.startswith("online.backbone.")} == set(
        ConvNet4().state_dict()
    )
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert stats <= set(recs[-1]) and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert ("momentum" in recs[-1]) == (method == "mocov2")


def test_projector_and_predictor_shapes_follow_each_paper():
    simclr = build_method(config.load("simclr-r50"))
    assert [type(m).__name__ for m in simclr.online.encoder.projector] == [
        "Linear", "BatchNorm1d", "ReLU", "Linear",
    ]  # fmt: skip
    assert simclr.online.encoder.projector[3].out_features == 128
    assert simclr.online.predictor is None and simclr.target is None
    moco = build_method(config.load("mocov2-r50"))
    head = moco.online.encoder.projector
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (2048, 2048, 128)
    assert moco.queue.shape == (65536, 128) and moco.online.predictor is None
    siam = build_method(config.load("simsiam-r50"))
    proj = siam.online.encoder.projector
    assert [type(m).__name__ for m in proj].count("BatchNorm1d") == 3
    assert not proj[-1].affine and proj[-2].out_features == 2048
    pred = siam.online.predictor
    assert (pred[0].out_features, pred[3].out_features) == (512, 2048) and siam.target is None


# ----------------------------------------------------------------- MoCo v2
def test_queue_enqueue_equals_a_hand_simulation():
    cfg = config.load("demo-cpu-mocov2", ["method.queue_size=40", "train.batch_size=8"])
    moco = build_method(cfg)
    assert isinstance(moco, MoCoV2)
    rows = [moco.queue[i].clone() for i in range(40)]
    ptr = 0
    g = torch.Generator().manual_seed(3)
    for m in (16, 16, 16, 8, 32):  # wraps around twice
        keys = F.normalize(torch.randn(m, cfg.model.proj_dim, generator=g), dim=1)
        moco.enqueue(keys)
        for j in range(m):
            rows[(ptr + j) % 40] = keys[j]
        ptr = (ptr + m) % 40
    assert int(moco.queue_ptr) == ptr == (16 * 3 + 8 + 32) % 40
    assert torch.equal(moco.queue, torch.stack(rows))


def test_engine_fills_the_queue_with_unit_keys_and_resume_restores_it_exactly(tmp_path):
    extra = ("method.queue_size=80",)
    a = trainer(tmp_path / "a", tiny("mocov2", *extra))
    a.run()
    # 8 micro-steps of 2 views × 16 keys: the pointer went round 256 / 80 times
    assert int(a.method.queue_ptr) == (8 * 2 * 16) % 80
    assert torch.allclose(a.method.queue.norm(dim=1), torch.ones(80), atol=1e-5)
    first = trainer(tmp_path / "b", tiny("mocov2", *extra), max_steps=3)
    assert first.run().stopped == "max_steps"  # mid-epoch (4 steps per epoch)
    b = trainer(tmp_path / "b", tiny("mocov2", *extra))
    b.run()
    wa = checkpoint.load_safetensors(checkpoint.resolve(tmp_path / "a").weights)[0]
    wb = checkpoint.load_safetensors(checkpoint.resolve(tmp_path / "b").weights)[0]
    assert wa.keys() == wb.keys() and {"queue", "queue_ptr"} <= wa.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_key_encoder_momentum_is_constant(tmp_path):
    t = trainer(tmp_path, tiny("mocov2", "method.queue_size=64", "method.base_momentum=0.9"))
    online0 = [p.detach().clone() for p in t.method.online.encoder.parameters()]
    key0 = [p.detach().clone() for p in t.method.target.parameters()]
    t.run()
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert {r["momentum"] for r in recs if "momentum" in r} == {0.9}
    assert torch.equal(key0[0], online0[0])  # the key encoder starts as the query encoder


def test_split_batchnorm_equals_bn_per_sub_batch():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    sbn = SplitBatchNorm2d(3, 4)
    sbn.load_state_dict(bn.state_dict())
    x = torch.randn(16, 3, 5, 5, dtype=torch.float32)
    out = sbn(x)
    for b in range(4):  # sub-batch b: samples b, b+4, b+8, b+12
        ref = nn.BatchNorm2d(3)
        ref.load_state_dict(bn.state_dict())
        assert torch.allclose(out[b::4], ref(x[b::4]), atol=1e-5)
    # running statistics: the average of the sub-batches' updates
    refs = []
    for b in range(4):
        ref = nn.BatchNorm2d(3)
        ref.load_state_dict(bn.state_dict())
        ref(x[b::4])
        refs.append(ref.running_mean)
    assert torch.allclose(sbn.running_mean, torch.stack(refs).mean(0), atol=1e-6)
    fresh = SplitBatchNorm2d(3, 4)
    fresh.load_state_dict(bn.state_dict())
    cl = fresh(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, out)
    sbn.eval()
    bn.eval()
    bn.load_state_dict(sbn.state_dict())
    assert torch.equal(sbn(x), bn(x))  # eval mode: plain BN


def test_one_process_shuffle_returns_each_key_to_its_sample():
    x = torch.randn(12, 3, 4, 4)
    seen = []

    def encode(t):
        seen.append(t.clone())
        return t.flatten(1).sum(1, keepdim=True)

    out = shuffled_forward(encode, x, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x.flatten(1).sum(1, keepdim=True))
    assert not torch.equal(seen[0], x)  # the encoder saw another order


@pytest.mark.ddp
def test_shuffle_bn_over_two_processes_returns_each_key_to_its_sample(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tests.moco_worker", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    moved = 0
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        x, out = got["x"], got["out"]
        # column 0: the sample's own value (each key came back to its sample) ...
        assert torch.equal(out[:, 0], x.flatten(1).sum(1))
        # ... column 1: the rank that encoded it (some of every rank's samples went elsewhere)
        moved += int((out[:, 1] != rank).sum())
        assert 0 < int((out[:, 1] != rank).sum()) < len(x)
    assert moved > 0


def test_queue_smaller_than_one_step_of_keys_is_one_clear_error():
    with pytest.raises(Exception, match="method.queue_size 16 is smaller than the 32 keys"):
        build_method(
            config.load("demo-cpu-mocov2", ["method.queue_size=16", "train.batch_size=16"])
        )


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["model.sync_bn=true"], "shuffle-BN"),
        (["train.batch_size=12"], "multiple of method.bn_splits 8"),
    ],
)
def test_mocov2_config_rules(sets, match):
    with pytest.raises(Exception, match=match):
        config.load("demo-cpu-mocov2", sets)


# ----------------------------------------------------------------- SimSiam
def test_simsiam_predictor_lr_stays_constant_while_the_rest_follows_the_schedule(tmp_path):
    cfg = tiny("simsiam", "optim.warmup_epochs=1", "optim.lr=0.01")
    t = trainer(tmp_path, cfg)
    groups = t.opt.param_groups
    fixed = [g for g in groups if g.get("fixed_lr")]
    pred = {id(p) for p in t.method.online.predictor.parameters()}
    assert {id(p) for g in fixed for p in g["params"]} == pred
    seen: list[list[float]] = []
    step = t.opt.step

    def record(*a, **k):
        seen.append([g["lr"] for g in t.opt.param_groups])
        return step(*a, **k)

    t.opt.step = record  # type: ignore[method-assign]
    t.run()
    sched = WarmupCosine(0.01, 8, 4, cfg.optim.warmup_start_factor, 0.0)
    assert len(seen) == 8
    for k, lrs in enumerate(seen):
        for g, lr in zip(groups, lrs, strict=True):
            assert lr == (0.01 if g.get("fixed_lr") else pytest.approx(sched(k))), (k, g)
    assert (
        len(
            {lr for lrs in seen for lr, g in zip(lrs, groups, strict=True) if not g.get("fixed_lr")}
        )
        > 4
    )


# ----------------------------------------------------------------- checkpoints in the tools
@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "mocov2", "simsiam"])
def test_checkpoints_work_with_extract(tmp_path, method):
    run_dir = tmp_path / "run"
    trainer(run_dir, tiny(method, "train.epochs=1")).run()
    out = tmp_path / "backbone.safetensors"
    r = api.extract(run_dir, out)
    assert r.arch == "convnet4" and r.method == method
    w, _ = checkpoint.load_safetensors(out)
    net = ConvNet4()
    net.load_state_dict(w, strict=True)
    if method != "mocov2":  # no target network: one line says so
        r = subprocess.run(
            [sys.executable, "-m", "sslctl", "extract", str(run_dir), "-o", str(tmp_path / "t.pth"),
             "--part", "target"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"a {method} checkpoint has no target network" in r.stderr


@pytest.mark.slow
def test_a_baseline_checkpoint_runs_knn_eval_on_the_bundled_data(tmp_path):
    run_dir = tmp_path / "run"
    trainer(run_dir, tiny("simsiam", "train.epochs=1")).run()
    r = api.knn_eval(run_dir, data="bundled", out=tmp_path / "knn", device="cpu")
    assert 0.0 <= r.results["top1"] <= 100.0


# ----------------------------------------------------------------- profiles
@pytest.mark.parametrize(
    ("name", "expect"),
    [
        (
            "simclr-r50",
            {
                "method.name": "simclr", "optim.name": "lars", "optim.lr": 0.3 * 4096 / 256,
                "optim.weight_decay": 1e-6, "loss.temperature": 0.1, "optim.warmup_epochs": 10.0,
                "train.epochs": 200, "global_batch": 4096, "loss.gather_negatives": True,
                "data.views": "simclr", "data.crop_scale_min": 0.08, "model.proj_dim": 128,
                "model.proj_hidden": 2048, "paper.imagenet_top1": 60.6,
            },
        ),
        (
            "mocov2-r50",
            {
                "method.name": "mocov2", "optim.name": "sgd", "optim.lr": 0.03,
                "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "train.epochs": 200,
                "global_batch": 256, "method.base_momentum": 0.999, "method.queue_size": 65536,
                "loss.temperature": 0.2, "data.views": "mocov2", "data.crop_scale_min": 0.2,
                "model.sync_bn": False, "model.proj_dim": 128, "paper.imagenet_top1": 67.0,
            },
        ),
        (
            "simsiam-r50",
            {
                "method.name": "simsiam", "optim.name": "sgd", "optim.lr": 0.05 * 512 / 256,
                "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "train.epochs": 100,
                "global_batch": 512, "data.views": "mocov2", "model.proj_dim": 2048,
                "model.pred_hidden": 512, "paper.imagenet_top1": 68.1,
            },
        ),
    ],
)  # fmt: skip
def test_r50_profiles_hold_each_papers_recipe(name, expect):
    c = config.load(name)
    d = c.to_dict()
    for key, want in expect.items():
        if key == "global_batch":  # on the 8 GPUs the header names
            assert c.train.batch_size * c.train.accumulate * 8 == want
            continue
        sec, _, k = key.partition(".")
        assert d[sec][k] == pytest.approx(want), key


@pytest.mark.parametrize("method", ["byol", "simclr", "mocov2", "simsiam"])
def test_demo_variants_share_demo_cpu_network_data_budget_and_evaluation(method):
    base, c = config.load("demo-cpu"), config.load(f"demo-cpu-{method}")
    assert c.method.name == method
    assert c.model.arch == base.model.arch and c.train == base.train and c.optim == base.optim
    assert c.eval == base.eval and c.ckpt == base.ckpt
    assert (c.data.root, c.data.image_size, c.data.crop_scale_min) == (
        base.data.root, base.data.image_size, base.data.crop_scale_min,
    )  # fmt: skip
    assert c.data.views == {"byol": "byol", "simclr": "simclr"}.get(method, "mocov2")


def test_profiles_command_lists_the_baselines():
    r = subprocess.run(
        [sys.executable, "-m", "sslctl", "profiles"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    for name in ("simclr-r50", "mocov2-r50", "simsiam-r50", "demo-cpu-simclr", "demo-cpu-mocov2"):
        assert name in r.stdout, name


@pytest.mark.parametrize(
    ("name", "lr", "epochs"), [("mocov2-r50", 0.03, 200), ("simsiam-r50", 0.1, 100)]
)
def test_moco_and_simsiam_profiles_decay_the_lr_per_epoch_as_their_code(name, lr, epochs):
    """MoCo's and SimSiam's `adjust_learning_rate`: lr·½(1 + cos(π·epoch/epochs)) each epoch."""
    steps = 1_281_167 // (config.load(name).train.batch_size * 8)  # ImageNet on 8 GPUs
    sched = lr_schedule(config.load(name), steps)
    for k in (0, 1, steps - 1, steps, 7 * steps + 3, epochs * steps - 1):
        want = lr * 0.5 * (1.0 + math.cos(math.pi * (k // steps) / epochs))
        assert sched(k) == pytest.approx(want, rel=1e-12), k


def test_original_code_details_each_profile_keeps():
    siam = build_method(config.load("simsiam-r50"))
    bn3 = [m.bn3.weight for m in siam.online.encoder.backbone.modules() if hasattr(m, "bn3")]
    assert len(bn3) == 16 and all(bool((w == 0).all()) for w in bn3)  # zero_init_residual
    for name, decay_all in (("mocov2-r50", True), ("simsiam-r50", True), ("simclr-r50", False)):
        cfg = config.load(name, ["model.arch=resnet18"])
        groups = build_optimizer(cfg, build_method(cfg).online).param_groups
        wd = {g["weight_decay"] for g in groups}
        assert wd == ({cfg.optim.weight_decay} if decay_all else {0.0, cfg.optim.weight_decay})


def test_reference_init_builds_every_method():
    for m in ("simclr", "mocov2", "simsiam", "byol"):
        method = build_method(config.load(f"demo-cpu-{m}", ["model.init=reference"]))
        assert method.online.encoder.projector is not None


def test_resuming_is_not_refused_for_bookkeeping_keys():
    """A run started before `paper:`/`log:` existed, resumed with the same (now longer) profile
    or with --tensorboard / cuDNN autotuning switched: not a change of what is trained."""
    old = config.load("r50-3090x8").to_dict()
    del old["paper"], old["log"]
    del old["train"]["cudnn_benchmark"]
    new = config.load(
        "r50-3090x8", ["log.tensorboard=true", "train.cudnn_benchmark=true"]
    ).to_dict()
    assert new["paper"]["imagenet_top1"] > 0
    assert config_changes(json.dumps(old), new) == {}
    assert config_changes(json.dumps(old), {**new, "optim": {**new["optim"], "lr": 1.0}}) == {
        "optim.lr": [4.8, 1.0]
    }
