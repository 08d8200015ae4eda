"""Linear evaluation: the standard protocol (SPEC §3), its head and its result type.

Standard protocol: the backbone is frozen — eval mode, so its BN layers use and never update
their running statistics, no gradients, outside the optimizer and outside DDP — and one
Linear(feature_dim, classes) head is trained on its pooled features of RandomResizedCrop+flip
views, with SGD, a linear warm-up and a per-iteration cosine. Only the head is wrapped in DDP.
The backbone's forward runs under autocast (where the compute is); the head sees fp32
features and trains in fp32, so its gradients need no loss scaling (no GradScaler).
Top-1/top-5 on the validation set after every epoch (contiguous shards, counts summed over
ranks: every image counted once) and the best. Checkpoints (head, optimizer, position) are
written at every epoch end and on a stop signal; a rerun continues from the newest one.
The run state (position, checkpoint save/restore, stop flag) is the engine's ``run_state``;
the fast probe on cached features is ``eval.cached_probe``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from sslctl import UserError, dist, log
from sslctl.backbones import feature_dim
from sslctl.config import LinearConfig
from sslctl.data.tv import EvalDataset, WorkerLoader
from sslctl.data.views import linear_train, linear_val
from sslctl.engine.amp import AMP_DTYPES
from sslctl.engine.preempt import StopFlag
from sslctl.engine.run_state import (
    Position,
    find_checkpoint,
    read_checkpoint,
    save_agreed,
    stop_flag,
    truncate_metrics,
)
from sslctl.engine.schedules import WarmupCosine
from sslctl.eval.cache import state_digest
from sslctl.eval.features import loader_workers, shard_range
from sslctl.eval.knn import correct_counts, percent_correct
from sslctl.eval.splits import Splits
from sslctl.rundir import config_changes, show_value

KEEP_CHECKPOINTS = 2  # the newest two: one may be mid-write when a machine dies
# Settings that cannot change what the standard protocol computes: continuing with other values
# is not a change (the cached probe's and kNN's sections, decoding processes, logging cadence).
IRRELEVANT = ("description", "cached.", "knn.", "data.workers", "linear.log_every")


def probe_settings(cfg: LinearConfig) -> dict[str, Any]:
    """What a standard run is compared on when it continues: the profile."""
    return cfg.to_dict()


def settings_changes(saved_json: str, new: dict[str, Any]) -> dict[str, list[Any]]:
    """``rundir.config_changes`` for linear runs: a larger ``linear.epochs`` continues the run
    (as a larger ``train.epochs`` continues pre-training); IRRELEVANT keys are no change."""
    changes = config_changes(saved_json, new)
    out = {k: v for k, v in changes.items() if not k.startswith(IRRELEVANT)}
    old, now = out.get("linear.epochs", [None, None])
    if isinstance(old, int) and isinstance(now, int) and now > old:
        del out["linear.epochs"]
    return out


def freeze(backbone: nn.Module) -> nn.Module:
    """Eval mode (BN running statistics used, never updated) and no parameter gradients."""
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def make_head(dim: int, classes: int, seed: int) -> nn.Linear:
    """Linear(dim, classes), weights N(0, 0.01²) and zero bias (MoCo/DINO linear heads),
    drawn from its own generator so every rank and every rerun start from the same head."""
    head = nn.Linear(dim, classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    return head


class SeededViews(Dataset):
    """``dataset[indices[i]]`` with torch's RNG seeded by (seed, epoch, index) first.

    torchvision's random crop and flip draw from the global RNG; seeding it per sample makes
    every view a function of (seed, epoch, index) — independent of worker count and scheduling —
    so a run resumed mid-epoch sees exactly the views an uninterrupted run would have seen.
    """

    def __init__(self, dataset: Dataset, indices: list[int], seed: int, epoch: int):
        self.dataset, self.indices, self.seed, self.epoch = dataset, indices, seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        index = self.indices[i]
        torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)
        return self.dataset[index]


@dataclass(frozen=True)
class ProbeResult:
    top1: float  # last epoch, percent
    top5: float
    best_top1: float
    best_epoch: int  # 1-based
    epochs: int  # epochs completed
    history: list[dict[str, float]]  # per epoch: epoch, top1, top5, train_loss
    stopped: str  # done | signal
    backbone_unchanged: bool  # weights and BN buffers bit-identical to those loaded


class StandardProbe:
    """One run of the SPEC §3 protocol in ``run_dir`` (checkpoints/, metrics.jsonl)."""

    def __init__(
        self,
        cfg: LinearConfig,
        backbone: nn.Module,
        splits: Splits,
        run_dir: Path,
        di: dist.DistInfo,
        meta: dict[str, str],
    ):
        self.cfg, self.lin, self.di, self.splits = cfg, cfg.linear, di, splits
        self.settings = probe_settings(cfg)
        self.run_dir, self.ckpt_dir = run_dir, run_dir / "checkpoints"
        self.loaded_digest = state_digest(backbone.state_dict())
        self.meta = {**meta, "kind": "linear-eval", "weights_sha256": self.loaded_digest}
        self.backbone = freeze(backbone).to(di.device)
        if di.device.type == "cuda":
            self.backbone = self.backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.lin.batch_size % di.world_size:
            raise UserError(
                f"linear.batch_size {self.lin.batch_size} (global) does not split evenly over "
                f"{di.world_size} processes; choose a multiple of {di.world_size}"
            )
        self.batch = self.lin.batch_size // di.world_size
        dim = feature_dim(meta["arch"])
        self.head = make_head(dim, splits.num_classes, self.lin.seed).to(di.device)
        self.model: nn.Module = self.head
        if di.world_size > 1:
            ids = [di.device.index] if di.device.type == "cuda" else None
            self.model = DDP(self.head, device_ids=ids)
        self.opt = torch.optim.SGD(
            self.head.parameters(),
            self.lin.lr,
            self.lin.momentum,
            weight_decay=self.lin.weight_decay,
        )
        d = cfg.data
        train_spec = replace(linear_train(d.image_size), scale=(d.crop_scale_min, 1.0))
        self.train_ds = EvalDataset(splits.train, train_spec, d.max_image_pixels)
        self.val_ds = EvalDataset(
            splits.val, linear_val(d.image_size, d.resize), d.max_image_pixels
        )
        self.sampler: DistributedSampler[int] = DistributedSampler(
            self.train_ds, di.world_size, di.rank, shuffle=True, seed=self.lin.seed
        )
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.batch)
        self.total_steps = self.lin.epochs * self.steps_per_epoch
        warm = round(self.lin.warmup_epochs * self.steps_per_epoch)
        self.lr = WarmupCosine(
            self.lin.lr,
            self.total_steps,
            warm,
            self.lin.warmup_start_factor,
            self.lin.final_lr_factor,
        )
        self.pos = Position()
        self.best, self.best_epoch = -1.0, 0
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------- checkpoints
    def _train_state(self) -> dict[str, Any]:
        return {
            **self.pos.state(self.di.world_size),
            "optimizer": self.opt.state_dict(),
            "best_top1": self.best,
            "best_epoch": self.best_epoch,
            "history": self.history,
        }

    def save(self) -> None:
        """Rank 0 writes the head, optimizer and position; every rank learns whether it worked
        (the agreement is also the barrier), so a failed write stops all of them in one line."""
        verdict = save_agreed(
            self.di,
            self.ckpt_dir,
            self.pos.step,
            self._checkpoint,
            KEEP_CHECKPOINTS,
            lambda m: False,
        )
        if verdict.write_failed:
            raise UserError(
                f"cannot write a checkpoint in {self.ckpt_dir} ({verdict.error or 'failed on rank 0'}); "
                "the previous checkpoint is intact: fix that and rerun, or choose another --out"
            )

    def _checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
        """The head, what it was trained on and how, and the train state (with the position)."""
        tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        settings = json.dumps(self.settings, sort_keys=True)  # = cfg.to_json()
        meta = {**self.meta, "epoch": str(self.pos.epoch), "config": settings}
        return tensors, meta, self._train_state()

    def restore(self) -> bool:
        """Continue from the newest verified checkpoint of this run, if any."""
        ck = find_checkpoint(self.ckpt_dir)
        if ck is None:
            return False
        tensors, meta, st, pos = read_checkpoint(
            ck, lambda _, m: self._check_same_run(m, ck.weights)
        )
        self.head.load_state_dict({k[len("head.") :]: v for k, v in tensors.items()})
        self.opt.load_state_dict(st["optimizer"])
        self.pos = pos
        self.best, self.best_epoch = float(st["best_top1"]), int(st["best_epoch"])
        self.history = list(st["history"])
        if int(st["world_size"]) != self.di.world_size and self.pos.batch:
            raise UserError(
                f"{ck.weights}: saved mid-epoch by {st['world_size']} processes; resume it with "
                f"--nproc-per-node {st['world_size']} (its data shards depend on the count)"
            )
        said = f"resumed linear evaluation from {ck.weights} (epoch {self.pos.epoch}, step {self.pos.step})"
        was = _saved_epochs(meta.get("config", ""))
        if was is not None and was < self.lin.epochs:
            said += f"; continuing to {self.lin.epochs} epochs (it was started for {was})"
        log.info(said)
        truncate_metrics(self.di, self.run_dir / "metrics.jsonl", self.pos.step)
        return True

    def _check_same_run(self, meta: dict[str, str], path: Path) -> None:
        if meta.get("weights_sha256") != self.loaded_digest:
            raise UserError(
                f"{path}: this run directory holds a linear evaluation of other weights "
                f"({meta.get('arch', '?')}, {meta.get('weights', '?')}); add --fresh to start "
                "over (it moves the old run to superseded/) or choose another --out"
            )
        changes = settings_changes(meta.get("config", ""), self.settings)
        if changes:
            items = [f"{k} {show_value(a)} → {show_value(b)}" for k, (a, b) in changes.items()]
            listed = ", ".join(items[:3]) + (f" … ({len(items)} in all)" if len(items) > 3 else "")
            raise UserError(
                f"{self.run_dir} was started with other settings ({listed}); rerun with its "
                "settings to continue (a larger linear.epochs continues it), add --fresh to "
                "start over (the old run moves to superseded/), or choose another --out"
            )

    # ----------------------------------------------------------------- training
    def _train_loader(self) -> DataLoader:
        """This rank's rest of the current epoch (the sampler's order, minus batches done)."""
        self.sampler.set_epoch(self.pos.epoch)
        indices = list(self.sampler)[self.pos.batch * self.batch :]
        seeded = SeededViews(self.train_ds, indices, self.lin.seed, self.pos.epoch)
        return self._loader(seeded, self.batch)

    def _loader(self, ds: Dataset, batch: int) -> DataLoader:
        return WorkerLoader(
            ds,
            batch_size=batch,
            shuffle=False,
            num_workers=loader_workers(self.cfg.data.workers),
            pin_memory=self.di.device.type == "cuda",
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (fp32) without autograd: nothing flows into the backbone."""
        dev = self.di.device
        x = x.to(dev, non_blocking=True)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = AMP_DTYPES[self.lin.precision]
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            return self.backbone(x).float().flatten(1)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self.model(self.features(x)), y.to(self.di.device))
        for g in self.opt.param_groups:
            g["lr"] = self.lr(self.pos.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def _epoch(self, bar: Any, task: Any, flag: StopFlag, metrics: log.MetricsWriter) -> str | None:
        """Train through the rest of the current epoch; "signal" when asked to stop mid-epoch.

        The epoch's train_loss is the mean over the steps run in this process (after a resume,
        the steps since the resume).
        """
        dev = self.di.device
        t0, seen = time.perf_counter(), 0
        window = torch.zeros(2, dtype=torch.float64, device=dev)  # loss sum, steps
        total = torch.zeros(2, dtype=torch.float64, device=dev)
        for x, y, _ in self._train_loader():
            loss = self._step(x, y)
            window += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=dev)])
            seen += x.shape[0] * self.di.world_size
            self.pos.step += 1
            self.pos.batch += 1
            if self.pos.step % self.lin.log_every == 0:
                self._log(metrics, bar, task, window, seen / max(time.perf_counter() - t0, 1e-9))
                total += window
                window.zero_()
            bar.update(task, completed=self.pos.step)
            if self.pos.batch < self.steps_per_epoch and flag.agreed():
                return "signal"
        total += window
        self.epoch_loss = float(dist.all_reduce_mean(total[0] / total[1].clamp_min(1)))
        self.pos.epoch += 1
        self.pos.batch = 0
        return None

    def _log(
        self, metrics: log.MetricsWriter, bar: Any, task: Any, window: torch.Tensor, rate: float
    ) -> None:
        loss = float(dist.all_reduce_mean(window[0] / window[1]))
        rec = {
            "step": self.pos.step,
            "epoch": self.pos.epoch + self.pos.batch / self.steps_per_epoch,
            "loss": loss,
            "lr": self.lr(self.pos.step - 1),
            "img_s": rate,
        }
        metrics.write(rec)
        bar.update(task, completed=self.pos.step, stats=log.step_stats(rec))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Top-1/top-5 (percent) of the current head on this rank's contiguous val shard,
        summed over ranks."""
        start, end = shard_range(len(self.val_ds), self.di.rank, self.di.world_size)
        counts = torch.zeros(3, dtype=torch.float64, device=self.di.device)
        val = Subset(self.val_ds, range(start, end))
        for x, y, _ in self._loader(val, self.cfg.data.eval_batch_size):
            y = y.to(self.di.device)
            counts[:2] += correct_counts(self.head(self.features(x)), y)
            counts[2] += y.shape[0]
        c = dist.all_reduce_mean(counts) * self.di.world_size
        return percent_correct(c, float(c[2]))

    def _end_epoch(self, metrics: log.MetricsWriter) -> None:
        scores = self.validate()
        if scores["top1"] > self.best:
            self.best, self.best_epoch = scores["top1"], self.pos.epoch
        rec = {"epoch": float(self.pos.epoch), **scores, "train_loss": self.epoch_loss}
        self.history.append(rec)
        metrics.write({"step": self.pos.step, **rec, "best_top1": self.best})
        log.info(
            f"epoch {self.pos.epoch}/{self.lin.epochs}: top-1 {scores['top1']:.2f}%  top-5 "
            f"{scores['top5']:.2f}%  (best {self.best:.2f}% at epoch {self.best_epoch})"
        )
        self.save()

    def run(self, desc: str = "linear-eval", tensorboard: bool = False) -> ProbeResult:
        """Train (or continue) to linear.epochs; ``tensorboard``: also RUN/tb/ events."""
        self.restore()
        tb = self.run_dir / "tb" if tensorboard else None
        metrics = log.MetricsWriter(self.run_dir / "metrics.jsonl", tb, self.pos.step + 1)
        stopped = "done"
        with stop_flag() as flag, log.make_progress(desc, unit="step") as bar:
            task = bar.add_task(desc, total=self.total_steps, completed=self.pos.step, stats="")
            while self.pos.epoch < self.lin.epochs:
                if self._epoch(bar, task, flag, metrics) == "signal":
                    self.save()
                    stopped = "signal"
                    break
                self._end_epoch(metrics)  # validates and checkpoints
                if self.pos.epoch < self.lin.epochs and flag.agreed():
                    stopped = "signal"
                    break
        metrics.close()
        return self._result(stopped)

    def _result(self, stopped: str) -> ProbeResult:
        unchanged = state_digest(self.backbone.state_dict()) == self.loaded_digest
        last = self.history[-1] if self.history else {"top1": float("nan"), "top5": float("nan")}
        return ProbeResult(
            top1=float(last["top1"]),
            top5=float(last["top5"]),
            best_top1=self.best,
            best_epoch=self.best_epoch,
            epochs=self.pos.epoch,
            history=self.history,
            stopped=stopped,
            backbone_unchanged=unchanged,
        )


def _saved_epochs(saved_json: str) -> int | None:
    """linear.epochs of a checkpoint's saved settings (None when unreadable)."""
    try:
        epochs = json.loads(saved_json)["linear"]["epochs"]
    except (ValueError, KeyError, TypeError):
        return None
    return epochs if isinstance(epochs, int) else None
