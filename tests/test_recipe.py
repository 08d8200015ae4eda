"""The paper code's recipe, to the letter: the mmcv 1.0.3 lr schedule, four independent
multi-resolution draws, and the reference initialisation (SPEC §1)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sslctl import UserError, config, dist
from sslctl.engine.fit import FitRequest, fit
from sslctl.engine.recipe import lr_schedule
from sslctl.engine.schedules import ReferenceLR, WarmupCosine
from sslctl.log import read_jsonl
from sslctl.methods import build_method
from sslctl.methods.triplet import multires_sizes
from tests.engine_helpers import TensorLoader


def mmcv_lr(
    k1: np.ndarray, big_l: float, e_total: int, s: int, a: int, w: float, r: float, m: float
):
    """The issue's formula, written out independently: optimizer step k (1-based) ends
    micro-iteration i = k·A − 1 of epoch e = ⌊(k − 1)/S⌋; per-epoch cosine times warm-up."""
    i = k1 * a - 1
    e = (k1 - 1) // s
    c = m + (big_l - m) * (1 + np.cos(np.pi * e / e_total)) / 2
    big_w = w * s * a
    return np.where(i < big_w, c * (r + (1 - r) * i / big_w), c)


def test_reference_lr_equals_the_formula_at_every_step_of_a_short_run() -> None:
    sched = ReferenceLR(2.0, epochs=5, steps_per_epoch=7, accumulate=3, warmup_epochs=2)
    k1 = np.arange(1, 5 * 7 + 1)
    want = mmcv_lr(k1, 2.0, 5, 7, 3, 2, 1e-4, 0.0)
    got = np.array([sched(int(k) - 1) for k in k1])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    # constant within an epoch once warm-up is over, as mmcv's by-epoch cosine
    assert len(set(got[14:21])) == 1 and got[21] < got[20]
    assert got[0] == pytest.approx(2.0 * (1e-4 + (1 - 1e-4) * 2 / 42))  # i = A − 1 = 2


# ImageNet: 1,281,167 images; micro-batches per rank per epoch with drop_last, then // accumulate.
IMAGENET = 1_281_167


@pytest.mark.parametrize(
    ("profile", "gpus"),
    [
        ("r50-3090x8", 8),
        ("r50-3090x8-ep200", 8),
        ("r50-12gx8", 8),
        ("byol-r50-3090x8", 8),
        ("r50-sysu30k", 4),
    ],
)
def test_profiles_use_the_reference_schedule_at_their_real_sizes(profile: str, gpus: int) -> None:
    cfg = config.load(profile, [])
    t, o = cfg.train, cfg.optim
    assert o.schedule == "reference" and cfg.model.init == "reference" and o.min_lr == 0.0
    micro = IMAGENET // gpus // t.batch_size
    s = micro // t.accumulate
    sched = lr_schedule(cfg, s)
    k1 = np.arange(1, t.epochs * s + 1)
    want = mmcv_lr(k1, o.lr, t.epochs, s, t.accumulate, o.warmup_epochs, o.warmup_start_factor, 0.0)
    got = np.fromiter((sched(int(k) - 1) for k in k1), dtype=np.float64, count=len(k1))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_reference_schedule_trains_at_a_lower_mean_lr_than_per_step() -> None:
    # the measured gap for 200 epochs: per-step's mean lr is about 4.7 % higher
    e, s, a = 200, 204, 4
    ref = ReferenceLR(4.8, e, s, a, 10)
    per = WarmupCosine(4.8, e * s, 10 * s)
    mean_ref = sum(ref(k) for k in range(e * s)) / (e * s)
    mean_per = sum(per(k) for k in range(e * s)) / (e * s)
    assert mean_per / mean_ref - 1 == pytest.approx(0.047, abs=0.003)


def test_reference_schedule_rejects_impossible_sizes() -> None:
    with pytest.raises(UserError, match="warmup_epochs 11"):
        ReferenceLR(1.0, 10, 5, 1, 11)
    with pytest.raises(UserError, match="at least one epoch"):
        ReferenceLR(1.0, 10, 0, 1, 1)


SMALL = [
    "model.arch=resnet18",
    "model.small_stem=true",
    "model.proj_hidden=64",
    "model.proj_dim=32",
    "model.pred_hidden=64",
    "optim.name=lars",
    "optim.lr=0.5",
    "optim.warmup_epochs=1",
    "optim.schedule=reference",
    "method.multires=true",
    "method.online_res_min=10",
    "method.online_res_max=16",
    "method.target_res_min=12",
    "method.target_res_max=16",
    "eval.knn_every=0",
    "train.batch_size=12",
    "train.accumulate=2",
    "train.precision=fp32",
    "train.epochs=3",
    "train.log_every=1",
]


@pytest.mark.slow
def test_engine_applies_the_reference_lr_at_every_step(tmp_path: Path) -> None:
    cfg = config.load("demo-cpu", SMALL)
    loader = TensorLoader(48, cfg.train.batch_size)  # 4 micro-batches = 2 steps per epoch
    torch.manual_seed(0)
    fit(FitRequest(cfg, tmp_path, loader, "none"), dist.DistInfo(0, 1, 0, torch.device("cpu")))
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "lr" in r]
    steps = np.array([r["step"] for r in recs])
    assert steps.tolist() == [1, 2, 3, 4, 5, 6]
    want = mmcv_lr(steps, 0.5, 3, 2, 2, 1, 1e-4, 0.0)
    np.testing.assert_allclose([r["lr"] for r in recs], want, rtol=1e-12)


def test_four_independent_multires_draws_seeded_by_step() -> None:
    cfg = config.load("r50-3090x8", [])
    draws = [multires_sizes(cfg, k) for k in range(400)]
    assert draws == [multires_sizes(cfg, k) for k in range(400)]  # same on every rank / resume
    o1, o2, t1, t2 = (np.array(x) for x in zip(*draws, strict=True))
    assert o1.min() >= 96 and o1.max() <= 224 and o2.min() >= 96 and o2.max() <= 224
    assert t1.min() >= 128 and t1.max() <= 224 and t2.min() >= 128 and t2.max() <= 224
    # independent: the two online (and the two target) sides differ in most steps
    assert (o1 != o2).mean() > 0.9 and (t1 != t2).mean() > 0.9
    assert abs(np.corrcoef(o1, o2)[0, 1]) < 0.2 and abs(np.corrcoef(t1, t2)[0, 1]) < 0.2


def test_each_forward_runs_at_its_own_size() -> None:
    cfg = config.load("demo-cpu", SMALL)
    method = build_method(cfg).train()
    seen: list[tuple[str, int]] = []

    def hook(name: str):
        return lambda _m, args: seen.append((name, args[0].shape[-1]))

    method.online.encoder.backbone.register_forward_pre_hook(hook("online"))
    method.target.backbone.register_forward_pre_hook(hook("target"))
    x1, x2 = next(TensorLoader(12, 12).epoch(0))
    method.step(method.online, x1, x2, step=7)
    s = multires_sizes(cfg, 7)
    assert seen == [
        ("online", s.online1),
        ("online", s.online2),
        ("target", s.target1),
        ("target", s.target2),
    ]


def _std_ok(w: torch.Tensor, want: float) -> bool:
    return abs(w.std().item() / want - 1) < 0.05


def test_reference_init_statistics() -> None:
    torch.manual_seed(0)
    cfg = config.load("r50-3090x8", [])
    method = build_method(cfg)
    enc, pred = method.online.encoder, method.online.predictor
    convs = [m for m in enc.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53
    for c in convs:
        fan_in = c.weight[0].numel()
        assert _std_ok(c.weight, math.sqrt(2 / fan_in)), (c, c.weight.std().item())
    for lin in (m for m in enc.projector.modules() if isinstance(m, nn.Linear)):
        assert _std_ok(lin.weight, math.sqrt(2 / lin.in_features)) and not lin.bias.any()
    for lin in (m for m in pred.modules() if isinstance(m, nn.Linear)):
        assert _std_ok(lin.weight, 0.01) and not lin.bias.any()
    for bn in (
        m for m in method.online.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ):
        assert (bn.weight == 1).all() and not bn.bias.any()  # no zero-init of residual BNs
    for k, v in enc.state_dict().items():  # the target copies the online encoder after init
        assert torch.equal(v, method.target.state_dict()[k]), k


def test_torchvision_init_is_kept_as_an_option() -> None:
    torch.manual_seed(0)
    cfg = config.load("r50-3090x8", ["model.init=torchvision"])
    conv = build_method(cfg).online.encoder.backbone.layer1[0].conv3  # fan_in 64, fan_out 256
    assert _std_ok(conv.weight, math.sqrt(2 / (256 * 1 * 1)))  # torchvision: fan_out
    assert not _std_ok(conv.weight, math.sqrt(2 / 64))
    with pytest.raises(UserError, match="model.init"):
        config.load("r50-3090x8", ["model.init=xavier"])
