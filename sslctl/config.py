"""Frozen configuration dataclasses loaded from profile YAML files.

A profile is a YAML mapping of sections (``model``, ``method``, ``loss``, ``optim``, ``train``,
``data``, ``ckpt``, ``init``, ``eval``) to flat ``key: value`` mappings: one level, no includes, no
inheritance. Unknown keys and wrong types are errors that name the key and the file.
``--set section.key=value`` overrides a value (parsed as YAML). Derived values are computed in code.

A top-level ``kind`` says what a profile configures: ``pretrain`` (the default, loaded by
``load`` into ``Config``) or ``linear-eval`` (sections ``linear``, ``data``, ``cached``, ``knn``,
loaded by ``load_linear`` into ``LinearConfig``). Each loader refuses the other kind.
"""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class MethodCfg:
    name: str = "triplet"  # triplet | byol
    base_momentum: float = 0.99  # m0 of the cosine target-momentum schedule
    multires: bool = True  # SPEC §1 multi-resolution inputs (triplet)
    online_res_min: int = 96
    online_res_max: int = 224
    target_res_min: int = 128
    target_res_max: int = 224


@dataclass(frozen=True)
class LossCfg:
    gamma: float = 2.0
    margin: float = 100.0
    drop_nearest: int = 1  # nearest negatives dropped ("truncated")
    keep: int = 9  # negatives averaged after the dropped ones
    gather_negatives: bool = False  # negatives from every GPU's micro-batch (not the reference)


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


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 1000
    batch_size: int = 196  # per-GPU micro-batch
    accumulate: int = 4  # micro-steps per optimizer step
    precision: str = "fp16"  # fp16 | bf16 | fp32
    seed: int = 0
    channels_last: bool = True  # only applied on CUDA
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
    "method.name": ("triplet", "byol"),
    "optim.name": ("lars", "sgd", "adamw"),
    "optim.schedule": ("reference", "per-step"),
    "model.init": ("reference", "torchvision"),
    "train.precision": ("fp16", "bf16", "fp32"),
    "data.backend": ("auto", "torchvision", "dali"),
    "model.arch": ("resnet18", "resnet34", "resnet50", "resnet101", "convnet4"),
    "linear.precision": ("fp16", "bf16", "fp32"),
}


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
        raise UserError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _profile_kind(raw: dict[str, Any], source: str) -> str:
    kind = raw.get("kind", "pretrain")
    if kind not in KINDS:
        raise UserError(f"{source}: key 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    return str(kind)


def _wrong_kind(source: str, kind: str, wanted: str) -> UserError:
    use = {"pretrain": "sslctl pretrain --profile", "linear-eval": "sslctl linear-eval --profile"}
    return UserError(
        f"{source}: a {kind} profile (kind: {kind}), not a {wanted} one; use it with "
        f"`{use[kind]} …`, or pick a {wanted} profile (see `sslctl profiles`)"
    )


def _build(cls: type, raw: Any, source: str, set_text: dict[str, str] | None = None) -> Any:
    """Instantiate ``cls`` (a top-level config: str fields and section dataclasses) from a
    mapping, checking every section, key, type and choice; errors name the key and ``source``.
    ``set_text``: ``section.key`` -> the text given to ``--set`` (named instead of the file)."""
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
            raise UserError(f"{source}: unknown section '{sec}' (known: {', '.join(top)})")
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
                f"{source}: unknown key '{name}' (known in '{sec}': {', '.join(types_)})"
            )
        vals[key] = _check_type(value, types_[key], f"{source}: key '{name}'")
        if isinstance(vals[key], float) and not math.isfinite(vals[key]):
            # inf passes range checks such as `lr > 0` and NaN makes them report the wrong thing
            where = f"--set {name}" if name in set_text else f"{source}: key '{name}'"
            raise UserError(f"{where}: {set_text.get(name, value)} is not a finite number")
        if name in CHOICES and vals[key] not in CHOICES[name]:
            raise UserError(
                f"{source}: key '{name}' must be one of {', '.join(CHOICES[name])}, got {value!r}"
            )
    return cls(**vals)


def from_dict(raw: Any, source: str, set_text: dict[str, str] | None = None) -> Config:
    """Build a Config from a sections mapping; `source` names the file in every error
    (``set_text``, from ``_read_raw``, names a --set instead where one gave the value)."""
    if isinstance(raw, dict) and "kind" in raw:
        kind = _profile_kind(raw, source)
        if kind != "pretrain":
            raise _wrong_kind(source, kind, "pretrain")
        raw = {k: v for k, v in raw.items() if k != "kind"}
    cfg: Config = _build(Config, raw, source, set_text)
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


def validate(cfg: Config, source: str) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(f"{source}: {msg}")

    need(cfg.train.epochs >= 1, "train.epochs must be >= 1")
    need(cfg.train.batch_size >= 1, "train.batch_size must be >= 1")
    need(cfg.train.accumulate >= 1, "train.accumulate must be >= 1")
    need(cfg.optim.lr > 0, "optim.lr must be > 0")
    need(
        not (cfg.model.arch == "convnet4" and cfg.model.small_stem),
        "model.small_stem applies to ResNets only; set it to false for convnet4",
    )
    need(
        not (
            cfg.model.arch == "convnet4"
            and cfg.method.multires
            and min(cfg.method.online_res_min, cfg.method.target_res_min) < 8
        ),
        "convnet4 halves its input three times: method.online_res_min and "
        "method.target_res_min must be >= 8",
    )
    need(cfg.loss.gamma > 0.0, "loss.gamma must be > 0")
    need(
        cfg.loss.drop_nearest >= 0 and cfg.loss.keep >= 1, "loss.drop_nearest >= 0, loss.keep >= 1"
    )
    need(0.0 <= cfg.method.base_momentum < 1.0, "method.base_momentum must be in [0, 1)")
    need(cfg.data.image_size >= 8, "data.image_size must be >= 8")
    need(0.0 < cfg.data.crop_scale_min <= 1.0, "data.crop_scale_min must be in (0, 1]")
    need(
        cfg.method.online_res_min <= cfg.method.online_res_max
        and cfg.method.target_res_min <= cfg.method.target_res_max,
        "method.*_res_min must be <= *_res_max",
    )
    need(cfg.ckpt.keep_last >= 1, "ckpt.keep_last must be >= 1")
    need(
        cfg.eval.knn_every == 0 or bool(cfg.eval.knn_train and cfg.eval.knn_val),
        "eval.knn_every needs eval.knn_train and eval.knn_val (labelled ImageFolder trees, or "
        "'bundled' for the demo set)",
    )
    need(
        cfg.eval.knn_k >= 1 and cfg.eval.knn_temperature > 0, "eval.knn_k >= 1, knn_temperature > 0"
    )
    need_n = cfg.loss.drop_nearest + cfg.loss.keep + 1
    need(
        cfg.method.name != "triplet" or cfg.train.batch_size >= need_n,
        f"train.batch_size {cfg.train.batch_size} is too small for the truncated triplet loss: each "
        f"micro-batch needs {need_n} samples (1 positive + {cfg.loss.drop_nearest} dropped + "
        f"{cfg.loss.keep} kept negatives); raise train.batch_size or lower loss.keep",
    )


def validate_linear(cfg: LinearConfig, source: str) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(f"{source}: {msg}")

    lin, d = cfg.linear, cfg.data
    need(lin.epochs >= 1 and cfg.cached.epochs >= 1, "linear.epochs and cached.epochs must be >= 1")
    need(lin.batch_size >= 1 and cfg.cached.batch_size >= 1, "batch sizes must be >= 1")
    need(lin.lr > 0 and cfg.cached.lr > 0, "linear.lr and cached.lr must be > 0")
    need(lin.weight_decay >= 0 and cfg.cached.weight_decay >= 0, "weight decay must be >= 0")
    need(
        0 <= lin.warmup_epochs <= lin.epochs and 0 <= cfg.cached.warmup_epochs <= cfg.cached.epochs,
        "warmup_epochs must be between 0 and epochs",
    )
    need(lin.log_every >= 1, "linear.log_every must be >= 1")
    need(d.image_size >= 8, "data.image_size must be >= 8")
    need(d.resize >= d.image_size, "data.resize must be >= data.image_size (centre crop)")
    need(0.0 < d.crop_scale_min <= 1.0, "data.crop_scale_min must be in (0, 1]")
    need(d.workers >= 0 and d.eval_batch_size >= 1, "data.workers >= 0, data.eval_batch_size >= 1")
    need(cfg.knn.k >= 1 and cfg.knn.chunk >= 1, "knn.k and knn.chunk must be >= 1")
    need(cfg.knn.temperature > 0, "knn.temperature must be > 0")


def profile_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"profile file not found: {p}")
        return p
    bundled = PROFILE_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        known = ", ".join(sorted(list_profiles(None)))
        raise UserError(f"unknown profile '{name_or_path}' (known: {known}; or pass a .yaml path)")
    return bundled


def profile_table() -> dict[str, tuple[str, str]]:
    """Bundled profile name -> (kind, one-line description)."""
    out = {}
    for p in sorted(PROFILE_DIR.glob("*.yaml")):
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
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
            raise UserError(f"--set {s!r}: expected section.key=value, e.g. --set optim.lr=2.4")
        key, val = s.split("=", 1)
        sec, name = key.strip().split(".", 1)
        try:
            parsed = yaml.safe_load(val) if val.strip() else ""
        except yaml.YAMLError:
            parsed = val
        out.setdefault(sec, {})[name] = parsed
    return out


def _read_raw(profile: str, sets: list[str]) -> tuple[dict[str, Any], str, dict[str, str]]:
    """The profile's mapping with --set overrides merged in, the source named in errors, and
    each --set key's text as typed (``optim.lr`` -> ``.inf``)."""
    path = profile_path(profile)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read profile ({e})") from None
    if raw is not None and not isinstance(raw, dict):
        raise UserError(f"{path}: a profile must be a YAML mapping of sections")
    raw = dict(raw or {})
    for sec, kv in parse_sets(sets).items():
        if sec in ("description", "kind") or not isinstance(raw.get(sec, {}), dict):
            raise UserError(f"--set {sec}.*: '{sec}' is not a settable section")
        raw[sec] = {**(raw.get(sec) or {}), **kv}
    texts = {k.strip(): v.strip() for k, v in (s.split("=", 1) for s in sets)}
    return raw, (str(path) if not sets else f"{path} (with --set)"), texts


def load(profile: str, sets: list[str] | None = None) -> Config:
    """Load a bundled pre-training profile (by name) or a YAML file, then apply --set overrides."""
    raw, src, texts = _read_raw(profile, sets or [])
    return from_dict(raw, src, texts)


def load_linear(profile: str, sets: list[str] | None = None) -> LinearConfig:
    """Load a linear-eval profile (``kind: linear-eval``) by name or path, with --set overrides."""
    raw, src, texts = _read_raw(profile, sets or [])
    return linear_from_dict(raw, src, texts)


def from_json(text: str, source: str = "checkpoint") -> Config:
    return from_dict(json.loads(text), source)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
