"""fit(): the pre-training loop — DDP, AMP, accumulation, LARS, schedules, EMA, checkpoints.

One AMP path (autocast + GradScaler(enabled=fp16)); DDP wraps only the online module; the target
stays outside DDP and the optimizer. ``Trainer.train_step`` is one optimizer step; ``_epoch`` and
``_run`` call out to logging and checkpointing. What the config builds is in ``recipe``; the run
state (position, checkpoints, status), shared with the linear probe, in ``run_state``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sslctl import UserError, checkpoint, dist, log
from sslctl.config import Config
from sslctl.data.loader import TwoViewLoader
from sslctl.engine.amp import AMP_DTYPES, nonfinite_grads
from sslctl.engine.preempt import StopFlag
from sslctl.engine.recipe import (
    build_model,
    build_optimizer,
    check_same_network,
    checkpoint_meta,
    load_training_state,
    lr_schedule,
    target_momentum,
)
from sslctl.engine.run_state import (
    Diverged,
    Position,
    TrainingHalted,
    find_checkpoint,
    newest_finite,
    read_checkpoint,
    save_agreed,
    status_is,
    stop_flag,
    truncate_metrics,
    write_config_record,
    write_status,
)


@dataclass(frozen=True)
class FitRequest:
    cfg: Config
    run_dir: Path
    loader: TwoViewLoader  # the data backend (torchvision, DALI) or a test's in-memory loader
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
    on_step: Callable[[int], None] | None = None  # called with the step count after each step


@dataclass(frozen=True)
class FitResult:
    step: int
    epoch: int
    stopped: str  # done | max_steps | signal | complete (nothing was left to do)
    checkpoint: Path | None
    last_loss: float
    images_per_s: float
    metrics: Path


class Trainer:
    """Holds the state of one run; ``run()`` trains until done, max_steps or a stop signal."""

    def __init__(self, req: FitRequest, di: dist.DistInfo):
        self.req, self.cfg, self.di = req, req.cfg, di
        cfg = self.cfg
        self.accum_steps = cfg.train.accumulate
        self.steps_per_epoch = req.loader.steps_per_epoch // self.accum_steps
        if self.steps_per_epoch < 1:
            raise UserError(
                f"one optimizer step needs {self.accum_steps} micro-batches of {cfg.train.batch_size} per process, "
                f"but the data gives only {req.loader.steps_per_epoch} per epoch; lower train.batch_size or "
                "train.accumulate, or use more images"
            )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.ckpt_dir = req.run_dir / "checkpoints"
        self.method, self.online = build_model(cfg, di, req.init_backbone)
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

    # ----------------------------------------------------------------- checkpoints
    def train_state(self) -> dict[str, Any]:
        return {
            **self.pos.state(self.di.world_size),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "nonfinite": self.nonfinite,
            "rng_torch": torch.get_rng_state(),
        }

    def save(self) -> Path | None:
        """Checkpoint the current step; returns its weights path (None: the step was skipped).

        Rank 0 writes, every rank learns the outcome (``run_state.save_agreed``): a failed write
        stops every rank with the previous checkpoint intact, non-finite weights stop the run as
        diverged, and a step whose loss was not finite is not saved (pruning never removes a
        good checkpoint in favour of a bad one)."""
        if self.nonfinite:
            log.warn(f"step {self.pos.step} is not checkpointed: its loss was not finite")
            return None
        if self.saved is not None and self._saved_step(self.saved) == self.pos.step:
            return self.saved  # an epoch end on a ckpt.every_steps step: saved already
        every = self.cfg.ckpt.every_epochs
        meta = lambda: checkpoint_meta(self.cfg, self.pos.epoch, self.req.data_root)  # noqa: E731
        verdict = save_agreed(
            self.di,
            self.ckpt_dir,
            self.pos.step,
            lambda: (self.method.state_tensors(), meta(), self.train_state()),
            self.cfg.ckpt.keep_last,
            lambda m: m.get("position") == 0 and every > 0 and m.get("epoch", 0) % every == 0,
            check_finite=True,
        )
        if verdict.nonfinite:
            raise Diverged(
                f"training diverged at step {self.pos.step}: the weights contain "
                f"{verdict.bad or 'non-finite values'}; nothing was saved from it — "
                f"{newest_finite(self.di, self.ckpt_dir)}"
            )
        if verdict.write_failed:
            raise TrainingHalted(
                f"cannot write a checkpoint in {self.ckpt_dir} ({verdict.error or 'failed on rank 0'}); the previous "
                "checkpoint is intact; fix that, then rerun to resume"
            )
        self.saved = checkpoint.CkptPaths.of(self.ckpt_dir, self.pos.step).weights
        return self.saved

    def load(self, ck: checkpoint.CkptPaths) -> None:
        def check(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
            checkpoint.check_finite(tensors, str(ck.weights))
            check_same_network(self.cfg, ck, meta)

        tensors, _, st, pos = read_checkpoint(ck, check)
        load_training_state(self.method, self.opt, tensors, st, ck, self.cfg, self.di.device)
        self.scaler.load_state_dict(st["scaler"])
        self.pos = pos
        self.nonfinite = int(st.get("nonfinite", 0))
        torch.set_rng_state(st["rng_torch"])
        if int(st.get("world_size", self.di.world_size)) != self.di.world_size:
            log.warn(
                "resuming with a different number of processes: the rest of this epoch is re-sharded"
            )

    def restore(self) -> checkpoint.CkptPaths | None:
        ck = find_checkpoint(self.ckpt_dir, self.req.resume)
        if ck is not None:
            self.load(ck)
            self.saved = ck.weights
            log.info(f"resumed from {ck.weights} (step {self.pos.step}, epoch {self.pos.epoch})")
        truncate_metrics(self.di, self.metrics_path, self.pos.step)
        return ck

    # ----------------------------------------------------------------- training
    def train_step(
        self,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        flag: StopFlag,
        window: dict[str, Any],
    ) -> tuple[torch.Tensor, int, bool]:
        """One optimizer step, top to bottom: the micro-steps of one accumulation cycle (forward
        under autocast, scaled backward; DDP syncs gradients on the last only), the all-rank
        agreement on finite loss/gradients and the stop flag (the step's one host sync), then
        the optimizer step (lr, clipping, scaler, step, target update, zero_grad) and the
        ``on_step`` hook. Adds the micro-steps' stats to ``window``; returns (the step's loss,
        images of all ranks, stop agreed)."""
        n = self.accum_steps
        loss_sum = torch.zeros((), device=self.di.device)
        images, last = 0, False
        while not last:
            v1, v2 = next(batches)
            last = (self.pos.batch + 1) % n == 0
            loss, micro_stats = self.micro_step(v1, v2, last)
            loss_sum += loss / n
            for k, v in micro_stats.items():
                window[k] = window.get(k, 0) + v.detach().float() / n
            images += v1.shape[0] * self.di.world_size
            self.pos.batch += 1
        usable, stop = self._agree(loss_sum, flag)
        self.optimizer_step(usable)
        if self.req.on_step is not None:
            self.req.on_step(self.pos.step)
        return loss_sum, images, stop

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
        micro_index = self.pos.step * self.accum_steps + (self.pos.batch % self.accum_steps)
        with sync:
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                out = self.method.step(self.online, v1, v2, micro_index)
            self.scaler.scale(out.loss / self.accum_steps).backward()
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

    def _agree(self, loss_sum: torch.Tensor, flag: StopFlag) -> tuple[bool, bool]:
        """(step usable, stop) agreed by every rank: the loss and gradient checks and the stop
        flag in one 3-value all-reduce, read with the step's one host sync."""
        dev = self.di.device
        stop = torch.tensor(float(flag.raised is not None), device=dev)
        bad_loss = (~torch.isfinite(loss_sum)).float()
        params = self.method.online.parameters()
        bad_grads, overflow_flag = nonfinite_grads(self.scaler, self.opt, params, dev)
        self._unscaled = self.scaler.is_enabled()
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
                f"step {self.pos.step}); nothing was saved from them — {newest_finite(self.di, self.ckpt_dir)}"
            )

    def _epoch(self, stop_at: int, bar: Any, task: Any, flag: StopFlag) -> str | None:
        """Train through the rest of the current epoch; returns a stop reason or None."""
        cfg = self.cfg
        micro_total = self.steps_per_epoch * self.accum_steps
        window: dict[str, Any] = {"_n": 0}
        t0, seen = time.perf_counter(), 0
        # The last micro-batches that do not fill an accumulation cycle are not trained on:
        # the loader stops before them (a DALI pipeline then ends cleanly and is reused).
        it = self.req.loader.epoch(
            self.pos.epoch, start_batch=self.pos.batch, end_batch=micro_total
        )
        while self.pos.batch < micro_total:
            loss, images, stop = self.train_step(it, flag, window)
            window["loss"] = window.get("loss", 0) + loss  # a skipped step makes the window NaN
            window["_n"] += 1
            seen += images
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            if self.pos.step % cfg.train.log_every == 0 or self.pos.step >= stop_at:
                rec = self._log(window, rate)
                self.last_loss, self.rate = rec.get("loss", float("nan")), rate
                window = {"_n": 0}
                bar.update(task, completed=self.pos.step, stats=log.step_stats(rec))
            bar.update(task, completed=self.pos.step)
            if stop:
                return "signal"
            if self.pos.step >= stop_at and self.pos.batch < micro_total:
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
        with stop_flag(self.req.stop) as flag:
            return self._run(flag)

    def _run(self, flag: StopFlag) -> FitResult:
        self.restore()
        most = self.req.max_steps
        stop_at = min(self.total_steps, most) if most else self.total_steps
        self.last_loss, self.rate = float("nan"), 0.0
        if self.pos.step >= stop_at:
            done = self.pos.step >= self.total_steps
            log.info(
                f"{self.req.run_dir} is complete at step {self.pos.step} (nothing to do)"
                if done
                else f"{self.req.run_dir} is at step {self.pos.step}, not before --max-steps "
                f"{self.req.max_steps} (nothing to do)"
            )
            self._write_status("done" if done else "max_steps", repair=True)
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
        p, saved = self.pos, self.saved
        return FitResult(
            p.step, p.epoch, stopped, saved, self.last_loss, self.rate, self.metrics_path
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
        data_root = self.req.data_root or self.cfg.data.root
        write_config_record(self.di, self.req.run_dir, self.cfg, self.pos.step, data_root)

    def _monitor(self) -> None:
        every = self.cfg.eval.knn_every
        if self.req.monitor is None or every <= 0 or self.pos.epoch % every != 0:
            return
        res = self.req.monitor(self.method.online.encoder.backbone)
        self.metrics.write({"step": self.pos.step, "epoch": self.pos.epoch, **res})
        log.info(f"epoch {self.pos.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))

    def _write_status(self, stopped: str, repair: bool = False) -> None:
        """RUN/status.json: what a wrapper script (Slurm requeue) reads to decide what to do.
        ``repair``: only when it is not right already (a run killed between its last checkpoint
        and its status write would leave a stale "signal": a wrapper would requeue for ever)."""
        if repair and status_is(self.di, self.req.run_dir, stopped, self.pos.step):
            return
        saved = self.saved
        if stopped == "diverged" and self.di.is_main:
            newest = checkpoint.newest_valid(self.ckpt_dir)
            saved = newest.weights if newest is not None else None
        data_root = self.req.data_root or self.cfg.data.root
        write_status(
            self.di, self.req.run_dir, stopped, self.pos, saved, data_root, self.req.changes
        )

    @staticmethod
    def _saved_step(path: Path) -> int:
        return int(path.name.split(".")[0].split("_")[1])


def fit(req: FitRequest, di: dist.DistInfo) -> FitResult:
    return Trainer(req, di).run()
