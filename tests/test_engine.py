from pathlib import Path

import pytest
import torch

from sslctl import UserError, checkpoint, config, dist
from sslctl.engine import amp, run_state
from sslctl.engine.fit import FitRequest, Trainer, fit
from sslctl.log import read_jsonl
from tests.engine_helpers import CPU, TensorLoader, small_cfg


def run(tmp: Path, cfg: config.Config, max_steps=None, resume="auto"):
    torch.manual_seed(0)
    loader = TensorLoader(48, cfg.train.batch_size)
    return fit(FitRequest(cfg, tmp, loader, resume, max_steps), CPU)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_safetensors(checkpoint.resolve(run_dir).weights)[0]


@pytest.mark.slow  # in-process resnet18 runs of several epochs
def test_full_run_writes_checkpoints_and_metrics(tmp_path):
    res = run(tmp_path, small_cfg())
    assert res.stopped == "done" and res.step == 3 * 2 and res.epoch == 3
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 7))
    for key in ("loss", "d_ap", "d_an", "lr", "momentum", "img_s", "feat_std"):
        assert key in recs[0], key
    assert recs[-1]["momentum"] > recs[0]["momentum"] >= 0.99
    assert (tmp_path / "config.yaml").is_file()
    steps = [c.step for c in checkpoint.list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [2, 4, 6]
    meta = checkpoint.read_metadata(checkpoint.resolve(tmp_path).weights)
    assert config.from_json(meta["config"]) == small_cfg()
    assert meta["method"] == "triplet" and meta["arch"] == "resnet18"


@pytest.mark.slow  # in-process resnet18 runs of several epochs
def test_resume_equals_uninterrupted(tmp_path):
    """N steps straight vs N/2 + resume + N/2 (mid-epoch split): identical weights."""
    cfg = small_cfg("train.epochs=2")
    a, b = tmp_path / "a", tmp_path / "b"
    run(a, cfg)
    first = run(b, cfg, max_steps=3)  # stops mid-epoch 1 (2 steps per epoch)
    assert first.stopped == "max_steps" and first.step == 3
    second = run(b, cfg)
    assert second.step == 4 and second.stopped == "done"
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow  # in-process resnet18 runs of several epochs
def test_target_gets_no_grad_and_follows_online(tmp_path):
    cfg = small_cfg()
    t = Trainer(FitRequest(cfg, tmp_path, TensorLoader(48, 12), "none"), CPU)
    assert all(not p.requires_grad for p in t.method.target.parameters())
    assert all(
        id(p) not in {id(q) for g in t.opt.param_groups for q in g["params"]}
        for p in t.method.target.parameters()
    )
    before = [p.clone() for p in t.method.target.parameters()]
    t.run()
    tgt = list(t.method.target.parameters())
    onl = list(t.method.online.encoder.parameters())
    assert all(p.grad is None for p in tgt)
    moved = sum(not torch.equal(a, b) for a, b in zip(before, tgt, strict=True))
    assert moved > len(tgt) // 2
    # the target moved towards the online network, not away
    d0 = sum((a - o).norm() for a, o in zip(before, onl, strict=True))
    d1 = sum((a - o).norm() for a, o in zip(tgt, onl, strict=True))
    assert d1 < d0


def test_ema_update_formula():
    cfg = small_cfg()
    from sslctl.methods import build_method

    m = build_method(cfg)
    for p in m.online.encoder.parameters():
        p.data.add_(1.0)
    t0 = [p.clone() for p in m.target.parameters()]
    o = [p.clone() for p in m.online.encoder.parameters()]
    m.update_target(0.9)
    for a, b, t in zip(t0, o, m.target.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * a + 0.1 * b, atol=1e-6)


@pytest.mark.slow  # in-process resnet18 runs of several epochs
def test_byol_method_trains(tmp_path):
    res = run(tmp_path, small_cfg("method.name=byol", "method.multires=false"))
    assert res.step == 6 and torch.isfinite(torch.tensor(res.last_loss))


def test_too_few_images_for_one_step(tmp_path):
    cfg = small_cfg("train.accumulate=5")
    with pytest.raises(UserError, match="one optimizer step needs 5 micro-batches"):
        Trainer(FitRequest(cfg, tmp_path, TensorLoader(48, 12), "none"), CPU)


def test_explicit_resume_without_checkpoint(tmp_path):
    cfg = small_cfg()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no valid checkpoint"):
        run(tmp_path / "r", cfg, resume=str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "change, message",
    [
        (["optim.name=adamw"], "other settings (optim.name lars → adamw)"),
        (["model.arch=convnet4", "model.small_stem=false"], "model.arch resnet18 → convnet4"),
        (["model.pred_hidden=32"], "its weights do not fit the network this profile builds"),
    ],
)
def test_resume_with_another_network_is_one_clear_error(tmp_path, change, message):
    """e.g. `make demo` over a runs/demo left by an older demo profile: refused, nothing lost."""
    run(tmp_path, small_cfg(), max_steps=2)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        run(tmp_path, small_cfg(*change))
    assert "\n" not in str(e.value) and "another --out" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


@pytest.mark.slow  # in-process resnet18 runs of several epochs
def test_nonfinite_loss_halts_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = small_cfg("train.max_nonfinite=2", "train.epochs=3")
    run(tmp_path, cfg, max_steps=2)
    from sslctl.engine import fit as fit_mod

    real = fit_mod.Trainer.micro_step

    def poisoned(self, v1, v2, last):
        loss, stats = real(self, v1, v2, last)
        return loss * float("nan"), stats

    monkeypatch.setattr(fit_mod.Trainer, "micro_step", poisoned)
    with pytest.raises(run_state.TrainingHalted, match="non-finite for 2 steps"):
        run(tmp_path, cfg)
    assert checkpoint.resolve(tmp_path).step == 2


@pytest.mark.slow  # in-process resnet18 runs of several epochs
def test_periodic_monitor_runs_every_n_epochs_and_logs(tmp_path):
    cfg = small_cfg(
        "eval.knn_every=2", "eval.knn_train=bundled", "eval.knn_val=bundled", "train.epochs=4"
    )
    calls = []

    def monitor(backbone):
        calls.append(backbone.training)
        return {"knn_top1": 42.0, "knn_top5": 99.0}

    loader = TensorLoader(48, cfg.train.batch_size)
    fit(FitRequest(cfg, tmp_path, loader, "none", monitor=monitor), CPU)
    assert len(calls) == 2  # after epochs 2 and 4
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "knn_top1" in r]
    assert [r["epoch"] for r in recs] == [2, 4] and recs[0]["knn_top1"] == 42.0


def test_nonfinite_gradients_with_a_finite_loss_stop_without_nan_weights(tmp_path, monkeypatch):
    """bf16/fp32 have no GradScaler: a finite loss with NaN gradients must not reach LARS
    (whose trust ratio would fall back to 1 and write NaN weights)."""
    cfg = small_cfg("train.max_nonfinite=2", "train.epochs=3")
    run(tmp_path, cfg, max_steps=2)
    from sslctl.engine import fit as fit_mod

    real = fit_mod.Trainer.micro_step

    def poisoned(self, v1, v2, last):
        loss, stats = real(self, v1, v2, last)
        next(self.method.online.parameters()).grad.fill_(float("nan"))
        return loss, stats

    monkeypatch.setattr(fit_mod.Trainer, "micro_step", poisoned)
    with pytest.raises(run_state.TrainingHalted, match="non-finite for 2 steps.*gradients"):
        run(tmp_path, cfg)
    assert checkpoint.resolve(tmp_path).step == 2
    assert all(torch.isfinite(v).all() for v in weights(tmp_path).values())


def test_one_host_sync_per_optimizer_step(tmp_path, monkeypatch):
    """The loss check, the gradient check and the stop flag are agreed in one collective and read
    with one ``tolist``/``item`` per optimizer step (there were two collectives and two reads)."""
    cfg = small_cfg("train.log_every=1000", "train.epochs=2")
    reads = {"n": 0, "collectives": 0}
    for name in ("all_reduce_max", "all_reduce_mean", "any_rank"):
        real_c = getattr(dist, name)

        def collective(*a, _real=real_c, **k):
            reads["collectives"] += 1
            return _real(*a, **k)

        monkeypatch.setattr(dist, name, collective)
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            reads["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    from sslctl.engine import fit as fit_mod

    counts: list[tuple[int, int]] = []
    real_step = fit_mod.Trainer.optimizer_step

    def step(self, finite):
        counts.append((reads["n"], reads["collectives"]))
        real_step(self, finite)

    monkeypatch.setattr(fit_mod.Trainer, "optimizer_step", step)
    res = run(tmp_path, cfg)
    assert res.step == 4
    # steps 1→2 and 3→4 lie within an epoch; 2→3 crosses the epoch end: the save reads its
    # weight-finiteness check and the agreed write verdict, and the stop flag is agreed once
    diffs = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(counts, counts[1:], strict=False)]
    assert diffs[0] == diffs[2] == (1, 1) and diffs[1][1] == 3 and diffs[1][0] <= 4


def test_fp16_fast_step_equals_gradscaler_step(tmp_path, monkeypatch):
    """fp16: after the agreed unscale the engine steps the optimizer itself (no second host
    sync); the weights must equal GradScaler.step's, which the engine falls back to when it
    cannot read the scaler's inf flag. A high initial scale makes the first steps overflow, so
    both the skip and the step paths run (convnet4: fp16 convolutions are slow on a CPU)."""
    import functools

    from sslctl.engine import fit as fit_mod

    scaler = functools.partial(torch.amp.GradScaler, init_scale=2.0**17)
    monkeypatch.setattr(fit_mod.torch.amp, "GradScaler", scaler)
    cfg = small_cfg(
        "train.precision=fp16", "train.epochs=2", "model.arch=convnet4", "model.small_stem=false"
    )
    fast = run(tmp_path / "fast", cfg)
    monkeypatch.setattr(amp, "found_inf", lambda scaler, opt: None)
    slow = run(tmp_path / "slow", cfg)
    assert fast.step == slow.step == 4
    a, b = weights(tmp_path / "fast"), weights(tmp_path / "slow")
    assert all(torch.isfinite(v).all() for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = checkpoint.load_train_state(checkpoint.resolve(tmp_path / "fast").state)
    # overflowing steps lowered the scale
    assert state["scaler"]["scale"] < 2.0**17, state["scaler"]
    assert state["optimizer"]["state"]  # and later steps stepped the optimizer
