"""CUDA paths that never run on a CPU machine: AMP (fp16 + GradScaler, bf16) against fp32 on
the same batch, channels_last, SyncBN conversion, GPU re-ID ranking against the CPU, and a
one-GPU pre-training smoke run with resume. All marked ``gpu`` (skipped without CUDA).

``benchmarks/gpu_check.sh`` runs them with ``pytest -m gpu`` on a lent GPU machine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslctl import api, config, dist
from sslctl.engine.fit import FitRequest, Trainer
from tests.engine_helpers import TensorLoader

pytestmark = pytest.mark.gpu

# The paper's path (ResNet, LARS, γ 2, predictor + EMA target) at a size that runs in seconds.
SMALL = [
    "model.arch=resnet18",
    "model.small_stem=true",
    "model.proj_hidden=256",
    "model.proj_dim=64",
    "model.pred_hidden=256",
    "method.multires=false",
    "optim.name=lars",
    "optim.lr=0.5",
    "optim.weight_decay=1e-6",
    "optim.warmup_epochs=0",
    "loss.gamma=2.0",
    "eval.knn_every=0",
    "data.image_size=32",
    "train.batch_size=64",
    "train.accumulate=1",
    "train.epochs=2",
    "train.log_every=1",
]


def _cuda() -> dist.DistInfo:
    return dist.DistInfo(0, 1, 0, torch.device("cuda", torch.cuda.current_device()))


def _trainer(tmp: Path, *extra: str) -> Trainer:
    torch.manual_seed(0)
    cfg = config.load("demo-cpu", SMALL + list(extra))
    loader = TensorLoader(256, cfg.train.batch_size, size=32)
    return Trainer(FitRequest(cfg, tmp, loader, "none"), _cuda())


def _loss_and_grads(t: Trainer, v1: torch.Tensor, v2: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One micro-step through the engine; gradients unscaled (fp16) and flattened in fp32.

    fp16: GradScaler starts at 2¹⁶, which may overflow the first gradients; as in training,
    such a step is skipped and the scale lowered, so retry until the scaler accepts one."""
    t.method.train()
    for _ in range(20):
        loss, _ = t.micro_step(v1, v2, last=True)
        if not t.scaler.is_enabled():
            break
        t.scaler.unscale_(t.opt)
        grads = [p.grad for p in t.method.online.parameters() if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            break
        t.scaler.step(t.opt)  # skipped by the scaler (inf found); then the scale is lowered
        t.scaler.update()
        t.opt.zero_grad(set_to_none=True)
    grads = [p.grad.float().flatten() for p in t.method.online.parameters() if p.grad is not None]
    return float(loss), torch.cat(grads)


@pytest.fixture
def exact_fp32():
    """fp32 references in true fp32: cuDNN's default TF32 convolutions would be the noise floor."""
    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was


# bf16 keeps 8 bits of mantissa: through a randomly initialised ResNet-18 with BN at batch 64
# the whole gradient's cosine to fp32 measured 0.886 (Triplet, H200) to 0.895 (BYOL, CPU bf16);
# fp16 with GradScaler stayed above 0.97 (Triplet, H200). The bounds guard against a broken AMP
# path (scaling, casts: cosine near 0), not against bf16's rounding.
@pytest.mark.parametrize("method", ["triplet", "byol"])
@pytest.mark.parametrize(("precision", "min_cos"), [("fp16", 0.97), ("bf16", 0.8)])
def test_amp_steps_are_finite_and_close_to_fp32(
    tmp_path: Path, exact_fp32: None, method: str, precision: str, min_cos: float
) -> None:
    v1, v2 = next(TensorLoader(64, 64, size=32, seed=3).epoch(0))
    m = f"method.name={method}"
    ref_loss, ref_grad = _loss_and_grads(
        _trainer(tmp_path / "fp32", "train.precision=fp32", m), v1, v2
    )
    assert math.isfinite(ref_loss) and torch.isfinite(ref_grad).all()
    t = _trainer(tmp_path / precision, f"train.precision={precision}", m)
    assert t.scaler.is_enabled() == (precision == "fp16")
    loss, grad = _loss_and_grads(t, v1, v2)
    assert math.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss - ref_loss) <= 0.05 * abs(ref_loss) + 1e-2, (loss, ref_loss)
    cos = F.cosine_similarity(grad, ref_grad, dim=0).item()
    print(
        f"{method} {precision}: loss {loss:.5f} vs fp32 {ref_loss:.5f}, gradient cosine {cos:.4f}"
    )
    assert cos > min_cos, cos
    t.optimizer_step(finite=True)  # LARS + target update in the AMP path: weights stay finite
    assert all(torch.isfinite(p).all() for p in t.method.parameters())


def test_channels_last_gives_the_same_step(tmp_path: Path, exact_fp32: None) -> None:
    v1, v2 = next(TensorLoader(64, 64, size=32, seed=4).epoch(0))
    byol = "method.name=byol"  # a smooth loss: no top-k choice of negatives to flip
    cl = _trainer(tmp_path / "cl", "train.precision=fp32", "train.channels_last=true", byol)
    conv = cl.method.online.encoder.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    plain = _trainer(tmp_path / "nc", "train.precision=fp32", "train.channels_last=false", byol)
    a, ga = _loss_and_grads(cl, v1, v2)
    b, gb = _loss_and_grads(plain, v1, v2)
    cos = F.cosine_similarity(ga, gb, dim=0).item()
    print(
        f"channels_last vs contiguous (fp32, TF32 off): loss {a:.6f} vs {b:.6f}, cosine {cos:.6f}"
    )
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert cos > 0.999


def test_syncbn_conversion_runs_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SyncBN replaces every BN of online and target and trains on the GPU under NCCL (one rank:
    this machine has one GPU, so the cross-rank reduction itself is not exercised here)."""
    import torch.distributed as tdist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    tdist.init_process_group("nccl", rank=0, world_size=1, device_id=_cuda().device)
    try:
        t = _trainer(tmp_path, "train.precision=bf16")
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(t.method)
        bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
        t.method = synced  # type: ignore[assignment]
        t.online = synced.online
        v1, v2 = next(TensorLoader(64, 64, size=32, seed=5).epoch(0))
        loss, grad = _loss_and_grads(t, v1, v2)
        assert math.isfinite(loss) and torch.isfinite(grad).all()
    finally:
        tdist.destroy_process_group()


def test_gpu_reid_ranks_equal_cpu_ranks() -> None:
    """Same features, same ranks on both devices, ties included. The features are small
    multiples of 1/8 so every score is exact in fp32 on any device: with continuous random
    features, summation order alone flips near-ties (the first GPU run found a few)."""
    from sslctl.eval.reid.metrics import LabeledFeatures, positive_ranks, summarize

    g = torch.Generator().manual_seed(0)
    n_g, n_q, d = 3000, 200, 64
    gf = torch.randint(-3, 4, (n_g, d), generator=g).float() / 8
    qf = torch.randint(-3, 4, (n_q, d), generator=g).float() / 8
    qf[:50] = gf[:50]  # some queries identical to gallery images
    gid = torch.randint(0, 60, (n_g,), generator=g)
    qid = torch.randint(1, 60, (n_q,), generator=g)
    cams_g, cams_q = torch.randint(1, 4, (n_g,), generator=g), torch.full((n_q,), 9)
    q = LabeledFeatures(qf, qid, cams_q)
    cpu = positive_ranks(q, LabeledFeatures(gf, gid, cams_g), block=64)
    gpu = positive_ranks(q, LabeledFeatures(gf.cuda(), gid, cams_g), block=64)
    assert (cpu.pess != cpu.opt).any()  # ties exist, and both tie rules are compared
    assert torch.equal(cpu.pess, gpu.pess.cpu()) and torch.equal(cpu.opt, gpu.opt.cpu())
    assert torch.equal(cpu.offsets, gpu.offsets.cpu()) and cpu.valid.any()
    assert summarize(cpu) == summarize(gpu)
    for metric in ("euclidean",):
        a = positive_ranks(q, LabeledFeatures(gf, gid, cams_g), metric=metric, block=50)
        b = positive_ranks(q, LabeledFeatures(gf.cuda(), gid, cams_g), metric=metric, block=50)
        assert torch.equal(a.pess, b.pess.cpu()) and torch.equal(a.opt, b.opt.cpu())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_pretrain_smoke_on_one_gpu_then_resume(tmp_path: Path, precision: str) -> None:
    """`sslctl pretrain` end to end on the GPU (bundled data, torchvision loader): finite loss,
    a checkpoint, and a resume that continues from it."""
    sets = SMALL + [
        f"train.precision={precision}",
        "train.batch_size=32",
        "data.backend=torchvision",
        "data.workers=2",
    ]
    out = tmp_path / "run"
    first = api.pretrain("demo-cpu", out, sets=sets, max_steps=3)
    assert first.fit.step == 3 and math.isfinite(first.fit.last_loss)
    assert first.fit.checkpoint is not None and first.fit.checkpoint.is_file()
    again = api.pretrain("demo-cpu", out, sets=sets, max_steps=5)
    assert again.fit.step == 5 and math.isfinite(again.fit.last_loss)
