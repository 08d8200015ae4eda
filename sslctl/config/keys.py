"""What a profile may say: its kinds, the choices and ranges of its keys, the keys it must name,
and the limits on profile files."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("pretrain", "linear-eval")

CHOICES: dict[str, tuple[str, ...]] = {
    "method.name": ("triplet", "byol", "simclr", "mocov2", "simsiam"),
    "data.views": ("byol", "simclr", "mocov2"),
    "optim.name": ("lars", "sgd", "adamw"),
    "optim.schedule": ("reference", "per-step"),
    "model.init": ("reference", "torchvision"),
    "train.precision": ("fp16", "bf16", "fp32"),
    "data.backend": ("auto", "torchvision", "dali"),
    "model.arch": ("resnet18", "resnet34", "resnet50", "resnet101", "convnet4"),
    "linear.precision": ("fp16", "bf16", "fp32"),
}

# Keys a pre-training profile must name itself (or through `extends:`): the defaults would
# otherwise pick the method and the network without the profile saying so.
REQUIRED = ("method.name", "model.arch")

MAX_PROFILE_BYTES = 1 << 20  # the bundled profiles are about 2 KB
MAX_YAML_DEPTH = 16  # a profile needs 2 (sections, then keys); room for a clear type error
MAX_EXTENDS = 8  # `extends:` steps from a profile to the root of its chain
QUOTE_LIMIT = 80  # characters of a user's value quoted in an error


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: ``lo``/``hi`` bounds (None: unbounded), each
    inclusive unless ``*_open``."""

    lo: float | None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo}, {self.hi}{right}"


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
FACTOR = Range(0, 1)  # a fraction of the learning rate
MOMENTUM = Range(0, 1, hi_open=True)  # 1 would freeze the average (LARS, SGD and AdamW's β1)
FRACTION = Range(0, 1, lo_open=True)  # a crop's share of the image: some of it, at most all
EPOCHS = Range(1, 100_000)
SEED = Range(0, 2**32 - 1)  # the seed × 1_000_003 + step stays within torch's 64-bit seed
WIDTH = Range(1, 65_536)  # MLP widths, batch sizes per process
PIXELS = Range(8, 4096)  # image sides: convnet4 halves three times; 4096 keeps a batch in memory

# The valid range of every numeric key of both kinds (``data.*`` is shared by them; the test
# suite checks that no numeric field is missing). Sizes and counts of work have an upper bound
# past which no machine could run them; "every N" counters and the pixel limit need none.
# Rules across keys live in validate() and validate_linear().
RANGES: dict[str, Range] = {
    "model.proj_hidden": WIDTH,
    "model.proj_dim": WIDTH,
    "model.pred_hidden": WIDTH,
    "method.base_momentum": MOMENTUM,
    "method.online_res_min": Range(1, 4096),  # ResNets accept any size (convnet4: validate)
    "method.online_res_max": Range(1, 4096),
    "method.target_res_min": Range(1, 4096),
    "method.target_res_max": Range(1, 4096),
    "method.queue_size": Range(1, 1 << 24),
    "method.bn_splits": Range(1, 1024),
    "loss.gamma": POSITIVE,
    "loss.temperature": POSITIVE,
    "loss.margin": NON_NEGATIVE,
    "loss.drop_nearest": Range(0, 65_535),
    "loss.keep": Range(1, 65_535),
    "optim.lr": POSITIVE,
    "optim.momentum": MOMENTUM,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.trust_coef": POSITIVE,
    "optim.warmup_epochs": NON_NEGATIVE,  # and <= train.epochs
    "optim.warmup_start_factor": FACTOR,
    "optim.final_lr_factor": FACTOR,
    "optim.clip_grad": NON_NEGATIVE,  # 0 = off
    "optim.min_lr": NON_NEGATIVE,
    "train.epochs": EPOCHS,
    "train.batch_size": WIDTH,
    "train.accumulate": Range(1, 4096),
    "train.seed": SEED,
    "train.log_every": Range(1),
    "train.max_nonfinite": Range(1),
    "data.image_size": PIXELS,
    "data.resize": Range(8, 8192),  # and >= data.image_size
    "data.crop_scale_min": FRACTION,
    "data.workers": Range(0, 256),
    "data.eval_batch_size": WIDTH,
    "data.max_image_pixels": Range(1),
    "ckpt.every_epochs": Range(0),  # 0 = no permanent checkpoints
    "ckpt.keep_last": Range(1),
    "ckpt.every_steps": Range(0),  # 0 = at epoch ends only
    "eval.knn_every": Range(0),  # 0 = off
    "eval.knn_k": Range(1, 100_000),
    "eval.knn_temperature": POSITIVE,
    "linear.epochs": EPOCHS,
    "linear.batch_size": Range(1, 2**20),  # global
    "linear.lr": POSITIVE,
    "linear.momentum": MOMENTUM,
    "linear.weight_decay": NON_NEGATIVE,
    "linear.warmup_epochs": NON_NEGATIVE,  # and <= linear.epochs
    "linear.warmup_start_factor": FACTOR,
    "linear.final_lr_factor": FACTOR,
    "linear.seed": SEED,
    "linear.log_every": Range(1),
    "cached.epochs": EPOCHS,
    "cached.batch_size": Range(1, 2**20),
    "cached.lr": POSITIVE,
    "cached.momentum": MOMENTUM,
    "cached.weight_decay": NON_NEGATIVE,
    "cached.warmup_epochs": NON_NEGATIVE,  # and <= cached.epochs
    "knn.k": Range(1, 100_000),
    "knn.temperature": POSITIVE,
    "knn.chunk": Range(1, 2**20),
    "paper.imagenet_top1": Range(0, 100),
    "paper.sysu30k_rank1": Range(0, 100),
}
