"""Linear evaluation: the standard protocol (SPEC §3) and the fast probe on cached features.

Standard protocol: the backbone is frozen — eval mode, so its BN layers use and never update
their running statistics, no gradients, outside the optimizer and outside DDP — and one
Linear(feature_dim, classes) head is trained on its pooled features of RandomResizedCrop+flip
views, with SGD, a linear warm-up and a per-iteration cosine. Only the head is wrapped in DDP.
The backbone's forward runs under autocast (where the compute is); the head sees fp32
features and trains in fp32, so its gradients need no loss scaling (no GradScaler).
Top-1/top-5 on the validation set after every epoch (contiguous shards, counts summed over
ranks: every image counted once) and the best. Checkpoints (head, optimizer, position) are
written at every epoch end and on a stop signal; a rerun continues from the newest one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from sslctl import UserError, checkpoint, dist, files, log
from sslctl.backbones import feature_dim
from sslctl.config import CachedCfg, LinearConfig
from sslctl.data.tv import EvalDataset, WorkerLoader
from sslctl.data.views import linear_train, linear_val
from sslctl.engine.preempt import StopFlag
from sslctl.engine.schedules import WarmupCosine
from sslctl.eval.cache import state_digest
from sslctl.eval.features import fits_in_free_memory, loader_workers, shard_range
from sslctl.eval.knn import correct_counts
from sslctl.eval.splits import Splits
from sslctl.rundir import config_changes, show_value

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
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


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0


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
        self.pos = _Position()
        self.best, self.best_epoch = -1.0, 0
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------- checkpoints
    def _train_state(self) -> dict[str, Any]:
        p = self.pos
        return {
            "step": p.step,
            "epoch": p.epoch,
            "batch_in_epoch": p.batch,
            "world_size": self.di.world_size,
            "optimizer": self.opt.state_dict(),
            "best_top1": self.best,
            "best_epoch": self.best_epoch,
            "history": self.history,
        }

    def save(self) -> None:
        """Rank 0 writes the head, optimizer and position; every rank learns whether it worked
        (the agreement is also the barrier), so a failed write stops all of them in one line."""
        error = ""
        if self.di.is_main:
            tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
            settings = json.dumps(self.settings, sort_keys=True)  # = cfg.to_json()
            meta = {**self.meta, "epoch": str(self.pos.epoch), "config": settings}
            try:
                checkpoint.save(self.ckpt_dir, self.pos.step, tensors, meta, self._train_state())
                checkpoint.prune(self.ckpt_dir, KEEP_CHECKPOINTS, lambda m: False)
            except OSError as e:
                error = files.write_error(e)
        if dist.any_rank(bool(error)):
            raise UserError(
                f"cannot write a checkpoint in {self.ckpt_dir} ({error or 'failed on rank 0'}); "
                "the previous checkpoint is intact: fix that and rerun, or choose another --out"
            )

    def restore(self) -> bool:
        """Continue from the newest verified checkpoint of this run, if any."""
        skip = lambda c, why: log.warn(f"skipping checkpoint {c.weights.name}: {why}")  # noqa: E731
        ck = checkpoint.newest_valid(self.ckpt_dir, skip)
        if ck is None:
            return False
        tensors, meta = checkpoint.load_safetensors(ck.weights)
        self._check_same_run(meta, ck.weights)
        self.head.load_state_dict({k[len("head.") :]: v for k, v in tensors.items()})
        st = checkpoint.load_train_state(ck.state)
        self.opt.load_state_dict(st["optimizer"])
        self.pos = _Position(int(st["step"]), int(st["epoch"]), int(st["batch_in_epoch"]))
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
        if self.di.is_main:
            log.truncate_jsonl(self.run_dir / "metrics.jsonl", self.pos.step)
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
        n = max(float(c[2]), 1.0)
        return {"top1": 100.0 * float(c[0]) / n, "top5": 100.0 * float(c[1]) / n}

    def _end_epoch(self, metrics: log.MetricsWriter) -> None:
        acc = self.validate()
        if acc["top1"] > self.best:
            self.best, self.best_epoch = acc["top1"], self.pos.epoch
        rec = {"epoch": float(self.pos.epoch), **acc, "train_loss": self.epoch_loss}
        self.history.append(rec)
        metrics.write({"step": self.pos.step, **rec, "best_top1": self.best})
        log.info(
            f"epoch {self.pos.epoch}/{self.lin.epochs}: top-1 {acc['top1']:.2f}%  top-5 "
            f"{acc['top5']:.2f}%  (best {self.best:.2f}% at epoch {self.best_epoch})"
        )
        self.save()

    def run(self, desc: str = "linear-eval", tensorboard: bool = False) -> ProbeResult:
        """Train (or continue) to linear.epochs; ``tensorboard``: also RUN/tb/ events."""
        self.restore()
        tb = self.run_dir / "tb" if tensorboard else None
        metrics = log.MetricsWriter(self.run_dir / "metrics.jsonl", tb, self.pos.step + 1)
        stopped = "done"
        with StopFlag() as flag, log.make_progress(desc, unit="step") as bar:
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


# ----------------------------------------------------------------- the cached-feature probe
def _standardiser(train_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the training features (std floored: dead units stay 0)."""
    mean = train_feats.mean(dim=0)
    std = train_feats.std(dim=0).clamp_min(1e-6)
    return mean, std


def fits_in_half_free(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` fits in half the accelerator's free memory (False for the CPU)."""
    return fits_in_free_memory(t.numel() * t.element_size(), device, 0.5)


def to_device_if_fits(
    t: torch.Tensor,
    device: torch.device,
    fits: Callable[[torch.Tensor, torch.device], bool] = fits_in_half_free,
) -> torch.Tensor:
    """The whole feature matrix on the accelerator when it fits (``fits``), else where it is."""
    return t.to(device) if fits(t, device) else t


def place_features(
    feats: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    fits: Callable[[torch.Tensor, torch.device], bool] = fits_in_half_free,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features on the accelerator when they fit, and their labels (int64) beside them."""
    feats = to_device_if_fits(feats, device, fits)
    return feats, labels.to(feats.device, torch.int64)


@torch.no_grad()
def _evaluate_head(
    head: nn.Linear,
    feats: torch.Tensor,
    labels: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    chunk: int = 8192,
) -> dict[str, float]:
    dev = head.weight.device
    counts = torch.zeros(2, dtype=torch.float64, device=dev)
    for i in range(0, feats.shape[0], chunk):
        x = (feats[i : i + chunk].to(dev) - stats[0]) / stats[1]
        counts += correct_counts(head(x), labels[i : i + chunk].to(dev))
    n = max(feats.shape[0], 1)
    return {"top1": 100.0 * float(counts[0]) / n, "top5": 100.0 * float(counts[1]) / n}


def train_cached_head(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    cfg: CachedCfg,
    device: torch.device,
    seed: int = 0,
    metrics: log.MetricsWriter | None = None,
    desc: str = "cached probe",
) -> ProbeResult:
    """A linear head on cached features (n×d, labels n): the fast proxy, not SPEC §3.

    Features are standardised per dimension with the training set's mean and std (a
    BatchNorm without affine parameters in front of the head, as MAE's linear probe does), so
    one learning rate suits backbones whose feature scales differ by orders of magnitude
    (a random initialisation and a trained one). SGD with momentum, warm-up then a
    per-iteration cosine; top-1/top-5 on the val features after every epoch.
    """
    (tf, ty), (vf, vy) = train, val
    tf, ty = place_features(tf, ty, device)
    stats = tuple(t.to(device) for t in _standardiser(tf))
    head = make_head(tf.shape[1], num_classes, seed).to(device)
    opt = torch.optim.SGD(head.parameters(), cfg.lr, cfg.momentum, weight_decay=cfg.weight_decay)
    spe = math.ceil(tf.shape[0] / cfg.batch_size)
    lr = WarmupCosine(cfg.lr, cfg.epochs * spe, round(cfg.warmup_epochs * spe))
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best, best_epoch, step = -1.0, 0, 0
    with log.make_progress(desc, unit="epoch", plain_every_s=5.0) as bar:
        task = bar.add_task(desc, total=cfg.epochs, stats="")
        for epoch in range(1, cfg.epochs + 1):
            order = torch.randperm(tf.shape[0], generator=g).to(tf.device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i in range(0, tf.shape[0], cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                x = (tf[idx].to(device) - stats[0]) / stats[1]
                loss = F.cross_entropy(head(x), ty[idx].to(device))
                opt.param_groups[0]["lr"] = lr(step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                step += 1
            acc = _evaluate_head(head, vf, vy, stats)  # type: ignore[arg-type]
            if acc["top1"] > best:
                best, best_epoch = acc["top1"], epoch
            rec = {"epoch": float(epoch), **acc, "train_loss": float(loss_sum) / spe}
            history.append(rec)
            if metrics is not None:
                metrics.write({"step": step, **rec, "best_top1": best})
            bar.update(task, advance=1, stats=f"top-1 {acc['top1']:.2f}%")
    last = history[-1]
    return ProbeResult(
        last["top1"], last["top5"], best, best_epoch, cfg.epochs, history, "done", True
    )
