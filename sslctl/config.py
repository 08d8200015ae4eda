"""Frozen configuration dataclasses loaded from profile YAML files.

A profile is a YAML mapping of sections (``model``, ``method``, ``loss``, ``optim``, ``train``,
``data``, ``ckpt``, ``init``, ``eval``, ``log``, ``paper``) to flat ``key: value`` mappings, one level deep. Unknown
keys, wrong types and values outside ``RANGES`` are errors that name the key and the file.
``--set section.key=value`` overrides a value (parsed as YAML). Derived values are computed in code.

A top-level ``extends: NAME_OR_PATH`` starts a profile from another one (a bundled name, or a
YAML path relative to the extending file), then overrides it section by section, key by key.
Chains are allowed up to ``MAX_EXTENDS`` steps; a cycle is an error. Without ``extends:``, a
pre-training profile must name ``method.name`` and ``model.arch`` itself (``REQUIRED``): a
file that names neither would otherwise train the defaults without saying so. Linear-eval
profiles need no key: their defaults are the standard protocol (SPEC §3) itself.

Profiles are read with a loader that refuses what a flat mapping never needs and a hostile
file could abuse: YAML aliases (a few hundred bytes of nested aliases expand to gigabytes),
nesting deeper than ``MAX_YAML_DEPTH``, duplicate keys (silently replaced otherwise), and
files over ``MAX_PROFILE_BYTES``.

A top-level ``kind`` says what a profile configures: ``pretrain`` (the default, loaded by
``load`` into ``Config``) or ``linear-eval`` (sections ``linear``, ``data``, ``cached``, ``knn``,
loaded by ``load_linear`` into ``LinearConfig``). Each loader refuses the other kind; a profile
inherits the kind of the one it extends and may not state another.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from sslctl import UserError

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class ModelCfg:
    arch: str = "resnet50"
    small_stem: bool = False  # 3x3 stride-1 stem without max-pool, for small images
    sync_bn: bool = True  # SyncBN when DDP runs on more than one GPU
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    # reference: the paper code's initialisation (kaiming fan_in convs and projector, N(0, 0.01)
    # predictor); torchvision: torchvision's ResNet init and PyTorch's Linear default.
    init: str = "torchvision"
    # ResNets: start each residual branch's last BN weight at 0 (SimSiam's code does); applied
    # by torchvision's init, so with model.init: torchvision
    zero_init_residual: bool = False


@dataclass(frozen=True)
class MethodCfg:
    name: str = "triplet"  # triplet | byol | simclr | mocov2 | simsiam
    # triplet/byol: m0 of the cosine target-momentum schedule; mocov2: the key encoder's
    # constant momentum (0.999 in MoCo); simclr/simsiam have no momentum network
    base_momentum: float = 0.99
    multires: bool = True  # SPEC §1 multi-resolution inputs (triplet)
    online_res_min: int = 96
    online_res_max: int = 224
    target_res_min: int = 128
    target_res_max: int = 224
    queue_size: int = 65536  # mocov2: keys in the queue of negatives
    # mocov2 on one process: the key (and query) encoders' batch statistics are taken over this
    # many sub-batches (MoCo's split-batch BN; 1 = off); with several processes, shuffle-BN
    bn_splits: int = 8


@dataclass(frozen=True)
class LossCfg:
    gamma: float = 2.0
    margin: float = 100.0
    drop_nearest: int = 1  # nearest negatives dropped ("truncated")
    keep: int = 9  # negatives averaged after the dropped ones
    gather_negatives: bool = False  # negatives from every GPU's micro-batch (not the reference)
    temperature: float = 0.1  # simclr (NT-Xent τ, 0.1) and mocov2 (InfoNCE τ, 0.2)


@dataclass(frozen=True)
class OptimCfg:
    name: str = "lars"  # lars | sgd | adamw (decoupled weight decay)
    lr: float = 4.8
    momentum: float = 0.9  # adamw: β1 (β2 = 0.999)
    weight_decay: float = 1e-6
    trust_coef: float = 0.001
    warmup_epochs: float = 10.0
    warmup_start_factor: float = 1e-4
    final_lr_factor: float = 0.0  # per-step: the cosine ends at final_lr_factor·lr
    clip_grad: float = 0.0  # 0 = no clipping
    # reference: mmcv 1.0.3's per-epoch cosine over all epochs, times a per-micro-iteration
    # warm-up; per-step: linear warm-up then a per-step cosine over the remaining steps.
    schedule: str = "per-step"
    min_lr: float = 0.0  # reference schedule: the cosine's floor (mmcv's min_lr)
    # false: no weight decay on BN parameters and biases (SPEC §1; SimCLR, BYOL); true: decay
    # every parameter, as MoCo's and SimSiam's code do (LARS still skips their trust ratio)
    decay_all: bool = False


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 1000
    batch_size: int = 196  # per-GPU micro-batch
    accumulate: int = 4  # micro-steps per optimizer step
    precision: str = "fp16"  # fp16 | bf16 | fp32
    seed: int = 0
    channels_last: bool = True  # only applied on CUDA
    # CUDA only: cuDNN times its convolution algorithms for each new input shape and keeps the
    # fastest. Off by default: multi-resolution inputs bring a new shape almost every step, and
    # the gain has not been measured on a GPU yet (benchmarks/bench_train_step.py --cudnn-benchmark)
    cudnn_benchmark: bool = False
    log_every: int = 10  # optimizer steps between metrics records
    max_nonfinite: int = 20  # consecutive non-finite losses before the run stops
    deterministic: bool = False


@dataclass(frozen=True)
class DataCfg:
    backend: str = "auto"  # auto | torchvision | dali
    root: str = ""  # data directory; "bundled" = the built-in demo set; --data overrides
    list_file: str = ""  # optional "relative/path label" list under root
    image_size: int = 224
    crop_scale_min: float = 0.08
    workers: int = 8
    pin_memory: bool = True
    # the augmentation recipe of the two views: byol (BYOL's asymmetric pair: Triplet and BYOL),
    # simclr (SimCLR's symmetric pair) or mocov2 (MoCo v2's symmetric pair: MoCo v2, SimSiam)
    views: str = "byol"
    # list-file entries whose paths resolve outside root (../, absolute, symlinks) are refused
    # unless this is true
    allow_outside_root: bool = False
    # images with more pixels are counted as "huge" and skipped: PIL's decompression-bomb error
    # threshold (2 × PIL.Image.MAX_IMAGE_PIXELS)
    max_image_pixels: int = 178956970


@dataclass(frozen=True)
class CkptCfg:
    every_epochs: int = 10  # keep a checkpoint every N epochs permanently
    keep_last: int = 3  # rolling checkpoints kept besides the permanent ones
    every_steps: int = 0  # also checkpoint every N optimizer steps (0 = only at epoch ends)


@dataclass(frozen=True)
class InitCfg:
    weights: str = ""  # start from these backbone weights (e.g. ImageNet pre-training)
    required: bool = False  # the profile only makes sense from given weights (SYSU-30k run)


@dataclass(frozen=True)
class EvalCfg:
    knn_every: int = 0  # kNN monitor every N epochs (0 = off)
    knn_train: str = ""  # labelled folder of the kNN memory bank ("bundled": the demo set's)
    knn_val: str = ""  # labelled folder of the kNN queries ("bundled": the demo set's)
    knn_k: int = 20
    knn_temperature: float = 0.07


@dataclass(frozen=True)
class LogCfg:
    tensorboard: bool = False  # also write the metrics as TensorBoard events under RUN/tb/


@dataclass(frozen=True)
class PaperCfg:
    """The published number this recipe is expected to reach (0 = the profile names none);
    ``sslctl report`` shows it beside the measured one."""

    imagenet_top1: float = 0.0  # ImageNet linear-evaluation top-1, %
    sysu30k_rank1: float = 0.0  # SYSU-30k re-identification rank-1, %


@dataclass(frozen=True)
class Config:
    description: str = ""
    model: ModelCfg = field(default_factory=ModelCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    data: DataCfg = field(default_factory=DataCfg)
    ckpt: CkptCfg = field(default_factory=CkptCfg)
    init: InitCfg = field(default_factory=InitCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    log: LogCfg = field(default_factory=LogCfg)
    paper: PaperCfg = field(default_factory=PaperCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


# ----------------------------------------------------------------- linear evaluation (kind: linear-eval)
@dataclass(frozen=True)
class LinearCfg:
    """SPEC §3, the standard protocol: a linear head on the frozen backbone's pooled features."""

    epochs: int = 100
    batch_size: int = 256  # global: split evenly over the processes
    lr: float = 0.04  # 0.04 after long pre-training, 0.15 after short (SPEC §3)
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 10.0
    warmup_start_factor: float = 1e-4
    final_lr_factor: float = 0.0
    precision: str = "fp16"  # autocast of the backbone's forward; the head trains in fp32
    seed: int = 0
    log_every: int = 50  # optimizer steps between metrics records


@dataclass(frozen=True)
class LinearDataCfg:
    image_size: int = 224  # train: RandomResizedCrop(image_size) + flip; val: CenterCrop
    resize: int = 256  # val: shorter side resized to this before the centre crop
    crop_scale_min: float = 0.08  # RandomResizedCrop scale (crop_scale_min, 1)
    workers: int = 8  # decoding processes per rank
    eval_batch_size: int = 256  # images per forward pass and process (validation, features)
    # --train/--val list files: as data.allow_outside_root and data.max_image_pixels of pretrain
    allow_outside_root: bool = False
    max_image_pixels: int = 178956970


@dataclass(frozen=True)
class CachedCfg:
    """The fast proxy (--protocol cached): centre-crop features extracted once, head on them."""

    epochs: int = 100
    batch_size: int = 1024
    lr: float = 0.1  # on standardised features (zero mean, unit variance per dimension)
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 5.0
    cache_dir: str = ""  # "" = RUN/cache; a shared folder lets runs re-use each other's features


@dataclass(frozen=True)
class KnnCfg:
    k: int = 20
    temperature: float = 0.07
    chunk: int = 1024  # queries per similarity block (memory ~ chunk × train images × 4 bytes)


@dataclass(frozen=True)
class LinearConfig:
    kind: str = "linear-eval"
    description: str = ""
    linear: LinearCfg = field(default_factory=LinearCfg)
    data: LinearDataCfg = field(default_factory=LinearDataCfg)
    cached: CachedCfg = field(default_factory=CachedCfg)
    knn: KnnCfg = field(default_factory=KnnCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


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


def _clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters: a quoted value never floods a one-line error."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _known(name: str, known: list[str], sec: str) -> str:
    """The close matches of a mistyped key, or every key of its section."""
    close = difflib.get_close_matches(name, known, n=2)
    if close:
        return "did you mean " + " or ".join(f"'{sec}.{c}'" for c in close) + "?"
    return f"known in '{sec}': {', '.join(known)}"


def _shown(value: Any) -> str:
    return _clip(repr(value))


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return value converted to tp (int→float allowed) or raise UserError naming `where`."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-6" as a string
            return float(value)
        except ValueError:
            pass
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise UserError(
            f"{where}: expected {tp.__name__}, got {type(value).__name__} {_shown(value)}"
        )
    return value


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _profile_kind(raw: dict[str, Any], source: str) -> str:
    kind = raw.get("kind", "pretrain")
    if kind not in KINDS:
        raise UserError(
            f"{source}: key 'kind' must be one of {', '.join(KINDS)}, got {_shown(kind)}"
        )
    return str(kind)


def _wrong_kind(source: str, kind: str, wanted: str) -> UserError:
    use = {"pretrain": "sslctl pretrain --profile", "linear-eval": "sslctl linear-eval --profile"}
    return UserError(
        f"{source}: a {kind} profile (kind: {kind}), not a {wanted} one; use it with "
        f"`{use[kind]} …`, or pick a {wanted} profile (see `sslctl profiles`)"
    )


def _build(cls: type, raw: Any, source: str, set_text: dict[str, str] | None = None) -> Any:
    """Instantiate ``cls`` (a top-level config: str fields and section dataclasses) from a
    mapping, checking every section, key, type, range and choice; errors name the key and
    ``source``. ``set_text``: ``section.key`` -> the text given to ``--set`` (named instead of
    the file)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{source}: a profile must be a YAML mapping of sections, got {type(raw).__name__}"
        )
    top = _section_types(cls)
    kwargs: dict[str, Any] = {}
    for sec, body in raw.items():
        if sec not in top:
            raise UserError(f"{source}: unknown section {_shown(sec)} (known: {', '.join(top)})")
        if top[sec] is str:  # description, kind
            kwargs[sec] = _check_type(body, str, f"{source}: {sec}")
            continue
        kwargs[sec] = _build_section(top[sec], sec, body, source, set_text or {})
    return cls(**kwargs)


def _build_section(cls: type, sec: str, body: Any, source: str, set_text: dict[str, str]) -> Any:
    if not isinstance(body, dict):
        raise UserError(f"{source}: section '{sec}' must be a mapping of key: value")
    types_ = _section_types(cls)
    vals = {}
    for key, value in body.items():
        name = f"{sec}.{key}"
        if key not in types_:
            raise UserError(
                f"{source}: unknown key {_clip(repr(name), 40)} ({_known(key, list(types_), sec)})"
            )
        vals[key] = _check_type(value, types_[key], f"{source}: key '{name}'")
        if isinstance(vals[key], float) and not math.isfinite(vals[key]):
            # inf passes range checks such as `lr > 0` and NaN makes them report the wrong thing
            where = f"--set {name}" if name in set_text else f"{source}: key '{name}'"
            raise UserError(
                f"{where}: {_clip(str(set_text.get(name, value)))} is not a finite number"
            )
        if name in RANGES and vals[key] not in RANGES[name]:
            raise UserError(f"{source}: {name} must be {RANGES[name]}, got {_shown(value)}")
        if name in CHOICES and vals[key] not in CHOICES[name]:
            raise UserError(
                f"{source}: key '{name}' must be one of {', '.join(CHOICES[name])}, "
                f"got {_shown(value)}"
            )
    return cls(**vals)


def from_dict(
    raw: Any,
    source: str,
    set_text: dict[str, str] | None = None,
    required: tuple[str, ...] = (),
) -> Config:
    """Build a Config from a sections mapping; `source` names the file in every error
    (``set_text``, from ``_read_raw``, names a --set instead where one gave the value).
    ``required``: keys the mapping must name (``REQUIRED`` for a profile)."""
    if isinstance(raw, dict) and "kind" in raw:
        kind = _profile_kind(raw, source)
        if kind != "pretrain":
            raise _wrong_kind(source, kind, "pretrain")
        raw = {k: v for k, v in raw.items() if k != "kind"}
    cfg: Config = _build(Config, raw, source, set_text)
    missing = []
    for key in required:
        sec, _, name = key.partition(".")
        if name not in (raw or {}).get(sec, {}):
            missing.append(key)
    if missing:
        raise UserError(
            f"{source}: missing {' and '.join(missing)}; a profile names its method and network "
            "(no defaults are assumed), or starts from another with `extends: NAME` (see "
            "`sslctl profiles`)"
        )
    validate(cfg, source)
    return cfg


def linear_from_dict(raw: Any, source: str, set_text: dict[str, str] | None = None) -> LinearConfig:
    """Build a LinearConfig; the mapping must say ``kind: linear-eval``."""
    kind = _profile_kind(raw, source) if isinstance(raw, dict) else "pretrain"
    if kind != "linear-eval":
        raise _wrong_kind(source, kind, "linear-eval")
    cfg: LinearConfig = _build(LinearConfig, raw, source, set_text)
    validate_linear(cfg, source)
    return cfg


def _check_warmup(source: str, warm_key: str, warm: float, epochs_key: str, epochs: int) -> None:
    """The schedules (engine.schedules) need the warm-up to fit inside the run."""
    if warm > epochs:
        raise UserError(
            f"{source}: {warm_key}={_num(warm)} must be <= {epochs_key}={epochs}; lower "
            f"{warm_key} (e.g. --set {warm_key}={epochs}) or raise {epochs_key}"
        )


def validate(cfg: Config, source: str) -> None:
    """Rules across keys (each key's own range is checked by ``_build``, from ``RANGES``)."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(f"{source}: {msg}")

    m = cfg.method
    need(
        not (cfg.model.arch == "convnet4" and cfg.model.small_stem),
        "model.small_stem applies to ResNets only; set it to false for convnet4",
    )
    need(
        not (cfg.model.arch == "convnet4" and cfg.model.zero_init_residual),
        "model.zero_init_residual applies to ResNets only; set it to false for convnet4",
    )
    need(
        not (cfg.model.init == "reference" and cfg.model.zero_init_residual),
        "model.zero_init_residual is part of torchvision's init, which model.init: reference "
        "replaces; set model.init: torchvision, or model.zero_init_residual: false",
    )
    need(
        not (
            cfg.model.arch == "convnet4"
            and m.multires
            and min(m.online_res_min, m.target_res_min) < 8
        ),
        "convnet4 halves its input three times: method.online_res_min and "
        "method.target_res_min must be >= 8",
    )
    for view, lo, hi in (
        ("online", m.online_res_min, m.online_res_max),
        ("target", m.target_res_min, m.target_res_max),
    ):
        need(
            lo <= hi,
            f"method.{view}_res_min={lo} must be <= method.{view}_res_max={hi}; "
            f"lower the first or raise the second",
        )
    _check_warmup(
        source, "optim.warmup_epochs", cfg.optim.warmup_epochs, "train.epochs", cfg.train.epochs
    )
    need(
        cfg.eval.knn_every == 0 or bool(cfg.eval.knn_train and cfg.eval.knn_val),
        "eval.knn_every needs eval.knn_train and eval.knn_val (labelled ImageFolder trees, or "
        "'bundled' for the demo set)",
    )
    need_n = cfg.loss.drop_nearest + cfg.loss.keep + 1
    need(
        cfg.method.name != "triplet" or cfg.train.batch_size >= need_n,
        f"train.batch_size {cfg.train.batch_size} is too small for the truncated triplet loss: each "
        f"micro-batch needs {need_n} samples (1 positive + {cfg.loss.drop_nearest} dropped + "
        f"{cfg.loss.keep} kept negatives); raise train.batch_size or lower loss.keep",
    )
    need(
        cfg.method.name == "triplet" or cfg.train.batch_size >= 2,
        f"method.name {cfg.method.name} needs train.batch_size >= 2 (batch statistics and "
        "negatives come from the other images of a micro-batch)",
    )
    if cfg.method.name == "mocov2":
        need(
            not cfg.model.sync_bn,
            "method.name mocov2 normalises the key encoder with shuffle-BN (each process's own "
            "batch statistics), which SyncBN would undo; set model.sync_bn: false",
        )
        need(
            cfg.train.batch_size % m.bn_splits == 0,
            f"train.batch_size {cfg.train.batch_size} must be a multiple of method.bn_splits "
            f"{m.bn_splits} (MoCo's split-batch BN on one process); change one of them, or set "
            "method.bn_splits: 1 to turn split-batch BN off",
        )


def validate_linear(cfg: LinearConfig, source: str) -> None:
    """Rules across keys (each key's own range is checked by ``_build``, from ``RANGES``)."""
    lin, cached, d = cfg.linear, cfg.cached, cfg.data
    _check_warmup(source, "linear.warmup_epochs", lin.warmup_epochs, "linear.epochs", lin.epochs)
    _check_warmup(
        source, "cached.warmup_epochs", cached.warmup_epochs, "cached.epochs", cached.epochs
    )
    if d.resize < d.image_size:
        raise UserError(
            f"{source}: data.resize must be >= data.image_size (centre crop), got "
            f"data.resize={d.resize} < data.image_size={d.image_size}; raise data.resize"
        )


# ----------------------------------------------------------------- reading profile files
class _RefusedYAML(yaml.YAMLError):
    """What ``_ProfileLoader`` refuses; the message starts with the line (``line N: …``)."""


class _ProfileLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases, deep nesting and duplicate keys: a profile is a flat
    ``section: {key: value}`` map and needs none of them, while a hostile or mistaken file can
    use aliases to expand a few hundred bytes to gigabytes ("billion laughs"), nesting to
    exhaust the composer's recursion, and a repeated key to silently replace the first."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        line = self.peek_event().start_mark.line + 1
        if self.check_event(yaml.AliasEvent):
            raise _RefusedYAML(
                f"line {line}: YAML aliases (*name) are not allowed in profiles; write the "
                "value out, or start from another profile with `extends:`"
            )
        if self.depth >= MAX_YAML_DEPTH:
            raise _RefusedYAML(
                f"line {line}: nested more than {MAX_YAML_DEPTH} levels deep; a profile is "
                "`section: {key: value}`"
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # unhashable keys: SafeLoader's own error; `<<` merges: its own rules
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first:
                raise _RefusedYAML(
                    f"line {line}: duplicate key {_shown(key)} (first on line {first[key]}); "
                    "keep one"
                )
            first[key] = line
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str) -> Any:
    """``text`` parsed by ``_ProfileLoader`` (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=_ProfileLoader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        return f"line {e.problem_mark.line + 1}: {e.problem or e.context or 'syntax error'}"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_yaml(path: Path) -> Any:
    """One profile file's YAML, or a UserError naming ``path``."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
        if len(data) > MAX_PROFILE_BYTES:
            raise UserError(
                f"{path}: larger than {MAX_PROFILE_BYTES >> 20} MB; a profile is a small YAML "
                "file of settings (is this the right file?)"
            )
        return _parse_yaml(data.decode("utf-8"))
    except _RefusedYAML as e:
        raise UserError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({_clip(_yaml_problem(e), 120)})") from None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or an int over 4300 digits
        raise UserError(f"{path}: cannot read profile ({_clip(str(e), 120)})") from None


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``: sections merge key by key, other values are replaced."""
    out = dict(parent)
    for k, v in child.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = {**out[k], **v} if both else v
    return out


def _resolve(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], str]:
    """The profile at ``path`` as one mapping, its ``extends:`` chain merged in (parents first),
    and the name it extends ("" when none). ``chain``: the profiles that extend this one."""
    raw = _read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: a profile must be a YAML mapping of sections, got {type(raw).__name__}"
        )
    if "extends" not in raw:
        return raw, ""
    parent_name = raw.pop("extends")
    if not isinstance(parent_name, str) or not parent_name.strip():
        raise UserError(
            f"{path}: key 'extends' must name a bundled profile or a .yaml file, got "
            f"{_shown(parent_name)}"
        )
    chain = (*chain, path.resolve())
    try:
        parent_path = profile_path(parent_name, base=path.parent)
    except UserError as e:
        raise UserError(f"{path}: extends: {e}") from None
    if parent_path.resolve() in chain:
        cycle = " → ".join(p.name for p in (*chain, parent_path.resolve()))
        raise UserError(f"{path}: `extends:` makes a cycle ({_clip(cycle, 160)}); break it")
    if len(chain) > MAX_EXTENDS:
        raise UserError(
            f"{path}: more than {MAX_EXTENDS} `extends:` steps; extend a profile nearer the root"
        )
    parent, _ = _resolve(parent_path, chain)
    parent_kind = parent.get("kind", "pretrain")
    if "kind" in raw and raw["kind"] != parent_kind:
        raise UserError(
            f"{path}: kind {_shown(raw['kind'])} but it extends {_clip(parent_name)} (kind "
            f"{parent_kind}); a profile extends one of its own kind (or leave out 'kind')"
        )
    return _merge(parent, raw), parent_name


def _is(test: typing.Callable[[], bool]) -> bool:
    """``test()`` (Path.exists / is_file), False where the name cannot be a file at all (too
    long, a NUL byte): those raise instead of answering False."""
    try:
        return test()
    except (OSError, ValueError):
        return False


def profile_path(name_or_path: str, base: Path | None = None) -> Path:
    """The file of a profile: a path (relative to ``base``, default the working directory)
    when it ends in .yaml/.yml or exists, else the bundled profile of that name."""
    p = (base or Path()) / Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or _is(p.exists):
        if not _is(p.is_file):
            raise UserError(f"profile file not found: {_clip(str(p), 160)}")
        return p
    bundled = PROFILE_DIR / f"{name_or_path}.yaml"
    if not _is(bundled.is_file):
        close = difflib.get_close_matches(name_or_path, sorted(list_profiles(None)), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"unknown profile {_shown(name_or_path)} ({hint}`sslctl profiles` lists the bundled "
            "ones; or pass a .yaml path)"
        )
    return bundled


def profile_table() -> dict[str, tuple[str, str]]:
    """Bundled profile name -> (kind, one-line description)."""
    out = {}
    for p in sorted(PROFILE_DIR.glob("*.yaml")):
        raw, _ = _resolve(p)
        out[p.stem] = (str(raw.get("kind", "pretrain")), str(raw.get("description", "")))
    return out


def list_profiles(kind: str | None = "pretrain") -> dict[str, str]:
    """Bundled profiles of one kind (None: every kind) -> their one-line descriptions."""
    return {n: desc for n, (k, desc) in profile_table().items() if kind is None or k == kind}


def parse_sets(sets: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings -> nested overrides (values parsed as YAML scalars)."""
    out: dict[str, dict[str, Any]] = {}
    for s in sets:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise UserError(
                f"--set {_shown(s)}: expected section.key=value, e.g. --set optim.lr=2.4"
            )
        key, val = s.split("=", 1)
        sec, name = key.strip().split(".", 1)
        try:
            parsed = _parse_yaml(val) if val.strip() else ""
        except (yaml.YAMLError, ValueError):  # not YAML, or refused: the type check judges the text
            parsed = val
        out.setdefault(sec, {})[name] = parsed
    return out


def _read_raw(profile: str, sets: list[str]) -> tuple[dict[str, Any], str, dict[str, str]]:
    """The profile's mapping (its ``extends:`` chain and --set overrides merged in), the source
    named in errors, and each --set key's text as typed (``optim.lr`` -> ``.inf``)."""
    path = profile_path(profile)
    raw, parent = _resolve(path)
    for sec, kv in parse_sets(sets).items():
        if sec in ("description", "kind", "extends") or not isinstance(raw.get(sec, {}), dict):
            raise UserError(f"--set {_clip(sec)}.*: '{_clip(sec)}' is not a settable section")
        raw[sec] = {**(raw.get(sec) or {}), **kv}
    texts = {k.strip(): v.strip() for k, v in (s.split("=", 1) for s in sets)}
    notes = [f"extends {_clip(parent, 60)}"] * bool(parent) + ["with --set"] * bool(sets)
    return raw, f"{path}" + (f" ({', '.join(notes)})" if notes else ""), texts


def load(profile: str, sets: list[str] | None = None) -> Config:
    """Load a bundled pre-training profile (by name) or a YAML file, then apply --set overrides."""
    raw, src, texts = _read_raw(profile, sets or [])
    return from_dict(raw, src, texts, REQUIRED)


def load_linear(profile: str, sets: list[str] | None = None) -> LinearConfig:
    """Load a linear-eval profile (``kind: linear-eval``) by name or path, with --set overrides."""
    raw, src, texts = _read_raw(profile, sets or [])
    return linear_from_dict(raw, src, texts)


def load_any(profile: str, sets: list[str] | None = None) -> Config | LinearConfig:
    """Load a profile of either kind (its ``kind`` picks the loader), with --set overrides."""
    raw, src, texts = _read_raw(profile, sets or [])
    if _profile_kind(raw, src) == "linear-eval":
        return linear_from_dict(raw, src, texts)
    return from_dict(raw, src, texts, REQUIRED)


def from_json(text: str, source: str = "checkpoint") -> Config:
    return from_dict(json.loads(text), source)


def to_yaml(cfg: Config | LinearConfig) -> str:
    """The resolved config as a profile that loads back to it (pretrain's has no ``kind``)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
