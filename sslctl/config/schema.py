"""The configuration dataclasses: the sections of a pre-training profile (``Config``) and of a
linear-eval profile (``LinearConfig``), with their defaults."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class _Resolved:
    """What both kinds of resolved configuration offer: their values as a dict and as JSON."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


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
class Config(_Resolved):
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
class LinearConfig(_Resolved):
    kind: str = "linear-eval"
    description: str = ""
    linear: LinearCfg = field(default_factory=LinearCfg)
    data: LinearDataCfg = field(default_factory=LinearDataCfg)
    cached: CachedCfg = field(default_factory=CachedCfg)
    knn: KnnCfg = field(default_factory=KnnCfg)
