"""fit(): the shared pre-training engine — DDP, AMP, accumulation, LARS, schedules, EMA, checkpoints.

One AMP path (autocast + GradScaler(enabled=fp16)); DDP wraps only the trained module (online);
the target stays outside DDP and the optimizer; schedules are arrays indexed by the optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sslctl import UserError, __version__, checkpoint, dist, files, last_line, log
from sslctl.config import Config, from_json, to_yaml
from sslctl.engine.lars import LARS, param_groups_lars
from sslctl.engine.preempt import StopFlag
from sslctl.engine.schedules import ReferenceLR, TargetMomentum, WarmupCosine
from sslctl.methods import SiameseMethod, build_method

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class _DDP(DDP):
    """DDP whose forward-time buffer broadcast keeps autograd's version counters.

    Both methods call the online network twice before one backward. DDP re-broadcasts the BN
    running statistics from rank 0 before each forward; before torch 2.12.1 that in-place copy
    bumped the buffers' version counters, and the first forward's saved tensors then failed
    backward ("modified by an inplace operation"). torch ≥ 2.12.1 does exactly this itself.
    """

    def _sync_buffers(self) -> None:
        keep = getattr(torch.autograd, "_unsafe_preserve_version_counter", None)
        if keep is None:
            return super()._sync_buffers()
        with keep(tuple(self.modules_buffers)):
            return super()._sync_buffers()


def _found_inf(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> torch.Tensor | None:
    """GradScaler's inf flag for ``opt`` after ``unscale_`` (a device scalar), or None when this
    torch keeps it elsewhere (then ``GradScaler.step`` decides, at the cost of its host sync)."""
    try:
        found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    except (AttributeError, KeyError, TypeError):
        return None
    if not found:
        return None
    return sum(v.reshape(()) for v in found.values())  # one entry: this process's one device


class TrainingHalted(UserError):
    """The run stopped itself for a reason the user must look at (non-finite loss, disk full)."""


class Diverged(TrainingHalted):
    """Training went non-finite: nothing was saved from it (the CLI exits with code 4)."""


@dataclass(frozen=True)
class FitRequest:
    cfg: Config
    run_dir: Path
    loader: (
        Any  # data backend: steps_per_epoch, epoch(e, start_batch, end_batch) -> (v1, v2) batches
    )
    resume: str = "auto"  # auto | none | a checkpoint path
    max_steps: int | None = None
    init_backbone: dict[str, torch.Tensor] | None = None  # init.weights, read by the caller
    # Periodic evaluation (eval.knn_every epochs), given the online backbone; called on every rank.
    monitor: Callable[[nn.Module], dict[str, float]] | None = None
    # Settings that differ from the resumed checkpoint's (accepted with --allow-changes):
    # key -> [old, new], recorded in metrics.jsonl and status.json.
    changes: dict[str, list[Any]] = field(default_factory=dict)
    data_root: str = ""  # the resolved data directory, recorded in config.yaml and status.json
    stop: StopFlag | None = None  # the caller's entered stop flag (None: fit enters its own)


@dataclass(frozen=True)
class FitResult:
    step: int
    epoch: int
    stopped: str  # done | max_steps | signal | complete (nothing was left to do)
    checkpoint: Path | None
    last_loss: float
    images_per_s: float
    metrics: Path


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch: int = 0  # micro-batches of `epoch` already consumed


def build_optimizer(
    cfg: Config, online: nn.Module, fixed_lr: tuple[str, ...] = ()
) -> torch.optim.Optimizer:
    """LARS, SGD or AdamW over the SPEC §1 groups: biases and BN parameters get no weight
    decay (and, under LARS, no trust ratio). Parameters named with a ``fixed_lr`` prefix get
    groups of their own marked ``fixed_lr`` (their lr stays at optim.lr: SimSiam's predictor).
    ``optim.decay_all`` decays the excluded group too (MoCo's and SimSiam's code)."""
    named = list(online.named_parameters())
    fixed = [(n, p) for n, p in named if fixed_lr and n.startswith(fixed_lr)]
    scheduled = [(n, p) for n, p in named if not (fixed_lr and n.startswith(fixed_lr))]
    groups = param_groups_lars(scheduled, cfg.optim.weight_decay)
    groups += [{**g, "fixed_lr": True} for g in param_groups_lars(fixed, cfg.optim.weight_decay)]
    if cfg.optim.decay_all:
        for g in groups:
            g["weight_decay"] = cfg.optim.weight_decay
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=o.lr, betas=(o.momentum, 0.999), weight_decay=o.weight_decay
        )
    if o.name == "lars":
        return LARS(
            groups,
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            trust_coef=o.trust_coef,
        )
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def lr_schedule(cfg: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """The lr at each optimizer step: ``optim.schedule`` reference (the paper code's mmcv
    semantics) or per-step (linear warm-up, then a per-step cosine)."""
    o, t = cfg.optim, cfg.train
    if o.schedule == "reference":
        return ReferenceLR(
            o.lr, t.epochs, steps_per_epoch, t.accumulate, o.warmup_epochs,
            o.warmup_start_factor, o.min_lr,
        )  # fmt: skip
    warm = round(o.warmup_epochs * steps_per_epoch)
    total = t.epochs * steps_per_epoch
    return WarmupCosine(o.lr, total, warm, o.warmup_start_factor, o.final_lr_factor)


def target_momentum(method: SiameseMethod, total_steps: int) -> Callable[[int], float] | None:
    """The target network's momentum at each optimizer step; None when the method has none."""
    if method.target is None:
        return None
    base = method.cfg.method.base_momentum
    if method.target_momentum == "constant":
        return lambda k: base
    return TargetMomentum(base, total_steps)


class Trainer:
    """Holds the state of one run; ``run()`` trains until done, max_steps or a stop signal."""

    def __init__(self, req: FitRequest, di: dist.DistInfo):
        self.req, self.cfg, self.di = req, req.cfg, di
        cfg = self.cfg
        self.acc = cfg.train.accumulate
        self.steps_per_epoch = req.loader.steps_per_epoch // self.acc
        if self.steps_per_epoch < 1:
            raise UserError(
                f"one optimizer step needs {self.acc} micro-batches of {cfg.train.batch_size} per process, "
                f"but the data gives only {req.loader.steps_per_epoch} per epoch; lower train.batch_size or "
                "train.accumulate, or use more images"
            )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.ckpt_dir = req.run_dir / "checkpoints"
        self.method: SiameseMethod = build_method(cfg)
        if req.init_backbone is not None:
            # Continue from given backbone weights (SPEC §1 SYSU-30k run): online and target alike.
            self.method.online.encoder.backbone.load_state_dict(req.init_backbone, strict=True)
            if self.method.target is not None:
                self.method.target.backbone.load_state_dict(req.init_backbone, strict=True)
        self.method.to(di.device)
        self._prepare_model()
        self.opt = build_optimizer(cfg, self.method.online, self.method.fixed_lr)
        self.scaler = torch.amp.GradScaler(di.device.type, enabled=cfg.train.precision == "fp16")
        # Evaluated per step: cheap for any run length (no list of 10⁵–10⁹ floats).
        self.lr = lr_schedule(cfg, self.steps_per_epoch)
        self.mom = target_momentum(self.method, self.total_steps)
        self.pos = Position()
        self.saved: Path | None = None  # the newest checkpoint of this run (restored or written)
        self.nonfinite = 0
        self._unscaled = False  # GradScaler.unscale_ already ran for this step (in _agree)
        self._overflow: bool | None = None  # this step's fp16 overflow, when known on the host
        self.metrics_path = req.run_dir / "metrics.jsonl"

    def _prepare_model(self) -> None:
        cfg, di = self.cfg, self.di
        cuda = di.device.type == "cuda"
        if cfg.model.sync_bn and di.world_size > 1 and cuda:
            self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)  # type: ignore[assignment]
        if cuda and cfg.train.precision == "fp32":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls in fp32 training only
        if cuda:
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        if cuda and cfg.train.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.online: nn.Module = self.method.online
        if di.world_size > 1:
            ids = [di.device.index] if cuda else None
            synced_bn = cfg.model.sync_bn and cuda
            self.online = _DDP(
                self.method.online,
                device_ids=ids,
                # SyncBN computes batch statistics over all ranks, so running statistics agree
                # without the forward-time broadcast; plain BN keeps rank 0's, as before.
                broadcast_buffers=not synced_bn,
                gradient_as_bucket_view=True,  # no separate gradient copy of every bucket
            )

    # ----------------------------------------------------------------- checkpoints
    def meta(self) -> dict[str, str]:
        c = self.cfg
        return {
            "method": c.method.name,
            "arch": c.model.arch,
            "small_stem": str(c.model.small_stem).lower(),
            "config": c.to_json(),
            "epoch": str(self.pos.epoch),
            "sslctl_version": __version__,
            "data_root": self.req.data_root,
        }

    def train_state(self) -> dict[str, Any]:
        p = self.pos
        return {
            "step": p.step,
            "epoch": p.epoch,
            "batch_in_epoch": p.batch,
            "world_size": self.di.world_size,
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "nonfinite": self.nonfinite,
            "rng_torch": torch.get_rng_state(),
        }

    def save(self) -> Path | None:
        """Checkpoint the current step; returns its weights path (None: the step was skipped).

        Rank 0 writes, every rank learns whether it worked (the all-reduce is also the barrier).
        A failed write stops every rank cleanly with the previous checkpoint intact; non-finite
        weights stop it as diverged, and a step whose loss was not finite is not saved at all, so
        pruning never removes a good checkpoint in favour of a bad one.
        """
        if self.nonfinite:
            log.warn(f"step {self.pos.step} is not checkpointed: its loss was not finite")
            return None
        if self.saved is not None and self._saved_step(self.saved) == self.pos.step:
            return self.saved  # an epoch end on a ckpt.every_steps step: saved already
        error, bad = "", ""
        if self.di.is_main:
            tensors = self.method.state_tensors()
            bad = checkpoint.nonfinite_summary(tensors)
            try:
                if not bad:
                    self._write_checkpoint(tensors)
            except OSError as e:
                error = files.write_error(e)
            except Exception as e:  # noqa: BLE001 - a writer's own error type (disk full, …):
                error = f"{type(e).__name__}: {last_line(e)}"  # told to every rank, not a hang
        failed = dist.all_reduce_max(
            torch.tensor([float(bool(error)), float(bool(bad))], device=self.di.device)
        ).tolist()
        if failed[1]:
            raise Diverged(
                f"training diverged at step {self.pos.step}: the weights contain "
                f"{bad or 'non-finite values'}; nothing was saved from it — "
                f"{self._newest_finite()}"
            )
        if failed[0]:
            raise TrainingHalted(
                f"cannot write a checkpoint in {self.ckpt_dir} ({error or 'failed on rank 0'}); the previous "
                "checkpoint is intact; fix that, then rerun to resume"
            )
        self.saved = checkpoint.CkptPaths.of(self.ckpt_dir, self.pos.step).weights
        return self.saved

    def _write_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        checkpoint.save(self.ckpt_dir, self.pos.step, tensors, self.meta(), self.train_state())
        every = self.cfg.ckpt.every_epochs
        checkpoint.prune(
            self.ckpt_dir,
            self.cfg.ckpt.keep_last,
            lambda m: m.get("position") == 0 and every > 0 and m.get("epoch", 0) % every == 0,
        )

    def _newest_finite(self) -> str:
        """Where a diverged run can continue from (every checkpoint written is finite)."""
        ck = checkpoint.newest_valid(self.ckpt_dir) if self.di.is_main else None
        if ck is None:
            return "no checkpoint was written before it; start again with a lower optim.lr"
        return (
            f"the newest finite checkpoint is {ck.weights} (step {ck.step}); continue from it "
            "with a lower optim.lr and --allow-changes, or use train.precision=bf16/fp32"
        )

    def load(self, ck: checkpoint.CkptPaths) -> None:
        tensors, meta = checkpoint.load_safetensors(ck.weights)
        checkpoint.check_finite(tensors, str(ck.weights))
        self._check_same_network(ck, meta)
        try:
            self.method.load_state_tensors({k: v.to(self.di.device) for k, v in tensors.items()})
        except RuntimeError as e:
            raise UserError(
                f"{ck.weights}: its weights do not fit the network this profile builds "
                f"({last_line(e)}); resume it with the profile it was started with, or start "
                f"a new run in another --out (or delete this one)"
            ) from None
        st = checkpoint.load_train_state(ck.state)
        try:
            self.opt.load_state_dict(st["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(
                f"{ck.state}: its optimizer state does not fit optim.name={self.cfg.optim.name} "
                f"({last_line(e)}); resume with the profile the run was started with, or start "
                f"a new run in another --out (or delete this one)"
            ) from None
        self.scaler.load_state_dict(st["scaler"])
        self.pos = Position(int(st["step"]), int(st["epoch"]), int(st["batch_in_epoch"]))
        self.nonfinite = int(st.get("nonfinite", 0))
        torch.set_rng_state(st["rng_torch"])
        if int(st.get("world_size", self.di.world_size)) != self.di.world_size:
            log.warn(
                "resuming with a different number of processes: the rest of this epoch is re-sharded"
            )

    def _check_same_network(self, ck: checkpoint.CkptPaths, meta: dict[str, str]) -> None:
        """A run continues only with the network and optimiser it was started with: e.g. a
        ``runs/demo`` left by an older demo profile is refused in one line, not a traceback."""
        if "config" not in meta:
            return
        try:
            was = from_json(meta["config"], str(ck.weights))
        except UserError:
            return  # a config this version cannot read: the tensor check below still guards
        now = self.cfg
        diffs = [
            f"{key} {a} → {b}"
            for key, a, b in (
                ("model.arch", was.model.arch, now.model.arch),
                ("model.small_stem", was.model.small_stem, now.model.small_stem),
                ("model.proj_dim", was.model.proj_dim, now.model.proj_dim),
                ("method.name", was.method.name, now.method.name),
                ("optim.name", was.optim.name, now.optim.name),
            )
            if a != b
        ]
        if diffs:
            raise UserError(
                f"{ck.weights}: this run was started with other settings ({', '.join(diffs)}); "
                f"resume it with its own profile, or start a new run in another --out (or delete this one)"
            )

    def restore(self) -> checkpoint.CkptPaths | None:
        ck = self._find_checkpoint()
        if ck is not None:
            self.load(ck)
            self.saved = ck.weights
            log.info(f"resumed from {ck.weights} (step {self.pos.step}, epoch {self.pos.epoch})")
        if self.di.is_main:  # records past the checkpoint belong to work that was lost
            log.truncate_jsonl(self.metrics_path, self.pos.step)
        return ck

    def _find_checkpoint(self) -> checkpoint.CkptPaths | None:
        r = self.req.resume
        if r == "none":
            return None
        if r == "auto":
            ck = checkpoint.newest_valid(
                self.ckpt_dir,
                lambda c, why: log.warn(f"skipping checkpoint {c.weights.name}: {why}"),
            )
        else:
            ck = checkpoint.resolve(Path(r))
        return ck

    # ----------------------------------------------------------------- training
    def micro_step(
        self, v1: torch.Tensor, v2: torch.Tensor, last: bool
    ) -> tuple[torch.Tensor, dict]:
        dev = self.di.device
        v1 = v1.to(dev, non_blocking=True)
        v2 = v2.to(dev, non_blocking=True)
        if dev.type == "cuda" and self.cfg.train.channels_last:
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
        sync = (
            contextlib.nullcontext()
            if last or not isinstance(self.online, DDP)
            else self.online.no_sync()
        )
        dtype = AMP_DTYPES[self.cfg.train.precision]
        micro_index = self.pos.step * self.acc + (self.pos.batch % self.acc)
        with sync:
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                out = self.method.step(self.online, v1, v2, micro_index)
            self.scaler.scale(out.loss / self.acc).backward()
        return out.loss.detach(), out.stats

    def optimizer_step(self, finite: bool) -> None:
        """LARS/SGD/AdamW step (skipped when not ``finite``), target update, zero_grad.

        After ``_agree`` (the training loop) the gradients are already unscaled and the
        overflow verdict is known on the host, so the fp16 step calls the optimizer itself
        instead of ``GradScaler.step``, which would read its inf flag with another host sync.
        """
        k = min(self.pos.step, self.total_steps - 1)
        lr = self.lr(k)
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.optim.lr if g.get("fixed_lr") else lr
        unscaled, self._unscaled = self._unscaled, False
        if finite:
            if self.cfg.optim.clip_grad > 0:
                if not unscaled:
                    self.scaler.unscale_(self.opt)
                    unscaled = True
                nn.utils.clip_grad_norm_(self.method.online.parameters(), self.cfg.optim.clip_grad)
            if unscaled and self._overflow is not None:
                if not self._overflow:
                    self.opt.step()
                self.scaler.update()  # lowers the scale after an overflow, as scaler.step would
            else:
                self.scaler.step(self.opt)
                self.scaler.update()
            if self.mom is not None:
                self.method.update_target(self.mom(k))
        elif unscaled:
            self.scaler.update()  # forget this step's unscale (and lower the scale on overflow)
        self._overflow = None
        self.opt.zero_grad(set_to_none=True)
        self.pos.step += 1

    def _log(self, window: dict[str, Any], imgs_per_s: float) -> dict[str, float]:
        n = max(window.pop("_n"), 1)
        keys = sorted(window)
        vals = dist.all_reduce_mean(torch.stack([window[k] for k in keys]).float() / n).tolist()
        rec = dict(zip(keys, vals, strict=True))
        k = min(self.pos.step - 1, self.total_steps - 1)
        rec.update(
            step=self.pos.step,
            epoch=self.pos.epoch + self.pos.batch / max(self.req.loader.steps_per_epoch, 1),
            lr=self.lr(k),
            img_s=imgs_per_s,
            loss_scale=float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0,
        )
        if self.mom is not None:
            rec["momentum"] = self.mom(k)
        self.metrics.write(rec)
        return rec

    def _bad_grads(self) -> tuple[torch.Tensor, bool]:
        """(1 when a gradient of this step is not finite, as a device scalar — no host sync;
        whether that is GradScaler's own overflow flag, i.e. known to the fp16 step).

        fp16: unscale now and take GradScaler's own inf flag (an overflow there is routine: the
        step is skipped and the scale lowered). bf16/fp32 have no scaler, so a finite loss with
        non-finite gradients would reach LARS, whose trust ratio then falls back to 1 and writes
        NaN weights: check the gradient norms.
        """
        dev = self.di.device
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
            self._unscaled = True
            found = _found_inf(self.scaler, self.opt)
            if found is None:
                return torch.zeros((), device=dev), False
            return found.to(dev), True
        grads = [p.grad for p in self.method.online.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=dev), False
        total = torch.stack(torch._foreach_norm(grads)).sum()
        return (~torch.isfinite(total)).float(), False

    def _agree(self, loss_sum: torch.Tensor, flag: StopFlag) -> tuple[bool, bool]:
        """(step usable, stop) agreed by every rank: the loss and gradient checks and the stop
        flag in one 3-value all-reduce, read with the step's one host sync."""
        dev = self.di.device
        stop = torch.tensor(float(flag.raised is not None), device=dev)
        bad_loss = (~torch.isfinite(loss_sum)).float()
        bad_grads, overflow_flag = self._bad_grads()
        flags = dist.all_reduce_max(torch.stack([bad_loss, bad_grads, stop]))
        bad_loss_v, bad_grads_v, stop_v = flags.tolist()
        fp16 = self.scaler.is_enabled()
        self._overflow = bad_grads_v > 0 if overflow_flag else None
        usable = bad_loss_v == 0 and (fp16 or bad_grads_v == 0)
        self._count_nonfinite(usable, "loss" if bad_loss_v else "gradients")
        return usable, stop_v > 0

    def _count_nonfinite(self, usable: bool, what: str) -> None:
        """Halt after train.max_nonfinite unusable steps in a row (nothing is saved from them)."""
        if usable:
            self.nonfinite = 0
            return
        self.nonfinite += 1
        log.warn(
            f"non-finite {what} at step {self.pos.step} ({self.nonfinite} in a row): step skipped"
        )
        if self.nonfinite >= self.cfg.train.max_nonfinite:
            raise Diverged(
                f"training diverged: non-finite for {self.nonfinite} steps in a row (last: {what}, "
                f"step {self.pos.step}); nothing was saved from them — {self._newest_finite()}"
            )

    def _epoch(self, stop_at: int, bar: Any, task: Any, flag: StopFlag) -> str | None:
        """Train through the rest of the current epoch; returns a stop reason or None."""
        loader, acc, cfg = self.req.loader, self.acc, self.cfg
        micro_total = self.steps_per_epoch * acc
        window: dict[str, Any] = {"_n": 0}
        loss_sum = torch.zeros((), device=self.di.device)
        t0, seen = time.perf_counter(), 0
        # The last micro-batches that do not fill an accumulation cycle are not trained on:
        # the loader stops before them (a DALI pipeline then ends cleanly and is reused).
        it = loader.epoch(self.pos.epoch, start_batch=self.pos.batch, end_batch=micro_total)
        for micro in range(self.pos.batch, micro_total):
            v1, v2 = next(it)
            last = (micro + 1) % acc == 0
            loss, stats = self.micro_step(v1, v2, last)
            loss_sum += loss / acc
            for k, v in stats.items():
                window[k] = window.get(k, 0) + v.detach().float() / acc
            seen += v1.shape[0] * self.di.world_size
            self.pos.batch = micro + 1
            if not last:
                continue
            finite, stop = self._agree(loss_sum, flag)
            self.optimizer_step(finite)
            window["loss"] = window.get("loss", 0) + loss_sum  # a skipped step makes the window NaN
            window["_n"] += 1
            loss_sum = torch.zeros((), device=self.di.device)
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            if self.pos.step % cfg.train.log_every == 0 or self.pos.step >= stop_at:
                rec = self._log(window, rate)
                self.last_loss, self.rate = rec.get("loss", float("nan")), rate
                window = {"_n": 0}
                bar.update(task, completed=self.pos.step, stats=log.step_stats(rec))
            bar.update(task, completed=self.pos.step)
            if stop:
                return "signal"
            if self.pos.step >= stop_at and micro + 1 < micro_total:
                return "max_steps"
            if cfg.ckpt.every_steps and self.pos.step % cfg.ckpt.every_steps == 0:
                self.save()
        self.pos.epoch += 1
        self.pos.batch = 0
        return None

    def run(self) -> FitResult:
        """Train until done, ``max_steps`` or an agreed stop signal. Signals are caught from the
        start (``req.stop``, entered by the caller before its data scan, or here) to the final
        status.json, so a SIGTERM at any moment ends in the same clean stop (exit 3)."""
        if self.req.stop is not None:
            return self._run(self.req.stop)
        with StopFlag() as flag:
            return self._run(flag)

    def _run(self, flag: StopFlag) -> FitResult:
        self.restore()
        stop_at = (
            self.total_steps
            if not self.req.max_steps
            else min(self.total_steps, self.req.max_steps)
        )
        self.last_loss, self.rate = float("nan"), 0.0
        if self.pos.step >= stop_at:
            done = self.pos.step >= self.total_steps
            log.info(
                f"{self.req.run_dir} is complete at step {self.pos.step} (nothing to do)"
                if done
                else f"{self.req.run_dir} is at step {self.pos.step}, not before --max-steps "
                f"{self.req.max_steps} (nothing to do)"
            )
            self._repair_status("done" if done else "max_steps")
            return self._result("complete")
        if flag.agreed():  # stopped while starting: the restored checkpoint is the last one
            self._write_status("signal")
            return self._result("signal")
        tb = self.req.run_dir / "tb" if self.cfg.log.tensorboard else None
        self.metrics = log.MetricsWriter(self.metrics_path, tb, self.pos.step + 1)
        self._record_start()
        self.method.train()
        reason: str | None = None
        try:
            with log.make_progress("pretrain", unit="step") as bar:
                task = bar.add_task("pretrain", total=stop_at, completed=self.pos.step, stats="")
                while self.pos.step < stop_at and reason is None:
                    reason = self._epoch(stop_at, bar, task, flag)
                    if reason is None and self.pos.batch == 0:  # an epoch ended
                        self.save()
                        if flag.agreed():  # no monitor pass past a stop signal's grace period
                            reason = "signal"
                            break
                        self._monitor()
                if self.saved is None or self._saved_step(self.saved) != self.pos.step:
                    self.save()
        except Diverged:
            self.metrics.close()
            self._write_status("diverged")
            raise
        self.metrics.close()
        stopped = "done" if self.pos.step >= self.total_steps else (reason or "max_steps")
        self._write_status(stopped)
        return self._result(stopped)

    def _result(self, stopped: str) -> FitResult:
        return FitResult(
            self.pos.step,
            self.pos.epoch,
            stopped,
            self.saved,
            self.last_loss,
            self.rate,
            self.metrics_path,
        )

    def _record_start(self) -> None:
        """config.yaml says exactly what runs (resolved data root, sslctl version); settings
        changed with --allow-changes are recorded in metrics.jsonl at the step they apply from."""
        if self.req.changes:
            self.metrics.write(
                {"step": self.pos.step, "event": "config_changed", "changes": self.req.changes}
            )
            listed = ", ".join(f"{k} {a} → {b}" for k, (a, b) in self.req.changes.items())
            log.warn(f"continuing step {self.pos.step} with changed settings: {listed}")
        if not self.di.is_main:
            return
        header = (
            f"# sslctl {__version__}: the configuration this run ran with (the last start: "
            f"step {self.pos.step})\n# data: {self.req.data_root or self.cfg.data.root}\n"
        )

        def write(tmp: str) -> None:
            Path(tmp).write_text(header + to_yaml(self.cfg), encoding="utf-8")

        files.atomic_write(self.req.run_dir / "config.yaml", write)

    def _monitor(self) -> None:
        every = self.cfg.eval.knn_every
        if self.req.monitor is None or every <= 0 or self.pos.epoch % every != 0:
            return
        res = self.req.monitor(self.method.online.encoder.backbone)
        self.metrics.write({"step": self.pos.step, "epoch": self.pos.epoch, **res})
        log.info(f"epoch {self.pos.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))

    def _repair_status(self, stopped: str) -> None:
        """status.json of a run killed between its last checkpoint and its status write (a
        wrapper would read a stale "signal" and requeue for ever); left alone when it is right."""
        if not self.di.is_main:
            return
        try:
            old = json.loads((self.req.run_dir / "status.json").read_text())
            if old.get("stopped") == stopped and old.get("step") == self.pos.step:
                return
        except (OSError, ValueError, AttributeError):
            pass
        self._write_status(stopped)

    def _write_status(self, stopped: str) -> None:
        """RUN/status.json: what a wrapper script (Slurm requeue) reads to decide what to do."""
        if not self.di.is_main:
            return
        saved = self.saved
        if stopped == "diverged":
            newest = checkpoint.newest_valid(self.ckpt_dir)
            saved = newest.weights if newest is not None else None
        status: dict[str, Any] = {
            "stopped": stopped,
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "checkpoint": str(saved) if saved is not None else None,
            "data_root": self.req.data_root or self.cfg.data.root,
            "sslctl_version": __version__,
        }
        if self.req.changes:
            status["changes"] = self.req.changes

        def write(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(status) + "\n")

        files.atomic_write(self.req.run_dir / "status.json", write)

    @staticmethod
    def _saved_step(path: Path) -> int:
        return int(path.name.split(".")[0].split("_")[1])


def fit(req: FitRequest, di: dist.DistInfo) -> FitResult:
    return Trainer(req, di).run()
