"""Frozen configuration dataclasses loaded from profile YAML files.

A profile is a YAML mapping of sections (``model``, ``method``, ``loss``, ``optim``, ``train``,
``data``, ``ckpt``, ``init``, ``eval``) to flat ``key: value`` mappings: one level, no includes, no
inheritance. Unknown keys and wrong types are errors that name the key and the file.
``--set section.key=value`` overrides a value (parsed as YAML). Derived values are computed in code.
"""

from __future__ import annotations

import dataclasses
import json
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
    name: str = "lars"  # lars | sgd
    lr: float = 4.8
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coef: float = 0.001
    warmup_epochs: float = 10.0
    warmup_start_factor: float = 1e-4
    final_lr_factor: float = 0.0
    clip_grad: float = 0.0  # 0 = no clipping


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
    knn_train: str = ""  # labelled folder of the kNN memory bank
    knn_val: str = ""  # labelled folder of the kNN queries
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


CHOICES: dict[str, tuple[str, ...]] = {
    "method.name": ("triplet", "byol"),
    "optim.name": ("lars", "sgd"),
    "train.precision": ("fp16", "bf16", "fp32"),
    "data.backend": ("auto", "torchvision", "dali"),
    "model.arch": ("resnet18", "resnet34", "resnet50", "resnet101"),
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


def from_dict(raw: Any, source: str) -> Config:
    """Build a Config from a sections mapping; `source` names the file in every error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{source}: a profile must be a YAML mapping of sections, got {type(raw).__name__}"
        )
    top = _section_types(Config)
    kwargs: dict[str, Any] = {}
    for sec, body in raw.items():
        if sec not in top:
            raise UserError(f"{source}: unknown section '{sec}' (known: {', '.join(top)})")
        if sec == "description":
            kwargs[sec] = _check_type(body, str, f"{source}: description")
            continue
        cls = top[sec]
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
            if name in CHOICES and vals[key] not in CHOICES[name]:
                raise UserError(
                    f"{source}: key '{name}' must be one of {', '.join(CHOICES[name])}, got {value!r}"
                )
        kwargs[sec] = cls(**vals)
    cfg = Config(**kwargs)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(f"{source}: {msg}")

    need(cfg.train.epochs >= 1, "train.epochs must be >= 1")
    need(cfg.train.batch_size >= 1, "train.batch_size must be >= 1")
    need(cfg.train.accumulate >= 1, "train.accumulate must be >= 1")
    need(cfg.optim.lr > 0, "optim.lr must be > 0")
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
    need_n = cfg.loss.drop_nearest + cfg.loss.keep + 1
    need(
        cfg.method.name != "triplet" or cfg.train.batch_size >= need_n,
        f"train.batch_size {cfg.train.batch_size} is too small for the truncated triplet loss: each "
        f"micro-batch needs {need_n} samples (1 positive + {cfg.loss.drop_nearest} dropped + "
        f"{cfg.loss.keep} kept negatives); raise train.batch_size or lower loss.keep",
    )


def profile_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"profile file not found: {p}")
        return p
    bundled = PROFILE_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        known = ", ".join(sorted(list_profiles()))
        raise UserError(f"unknown profile '{name_or_path}' (known: {known}; or pass a .yaml path)")
    return bundled


def list_profiles() -> dict[str, str]:
    """Bundled profile name -> its one-line description."""
    out = {}
    for p in sorted(PROFILE_DIR.glob("*.yaml")):
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        out[p.stem] = str(raw.get("description", ""))
    return out


def parse_sets(sets: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings -> nested overrides (values parsed as YAML scalars)."""
    out: dict[str, dict[str, Any]] = {}
    for s in sets:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise UserError(f"--set '{s}': expected section.key=value, e.g. --set optim.lr=2.4")
        key, val = s.split("=", 1)
        sec, name = key.strip().split(".", 1)
        try:
            parsed = yaml.safe_load(val) if val.strip() else ""
        except yaml.YAMLError:
            parsed = val
        out.setdefault(sec, {})[name] = parsed
    return out


def load(profile: str, sets: list[str] | None = None) -> Config:
    """Load a bundled profile (by name) or a YAML file, then apply --set overrides."""
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
    for sec, kv in parse_sets(sets or []).items():
        if sec == "description" or not isinstance(raw.get(sec, {}), dict):
            raise UserError(f"--set {sec}.*: '{sec}' is not a settable section")
        raw[sec] = {**(raw.get(sec) or {}), **kv}
    src = str(path) if not sets else f"{path} (with --set)"
    return from_dict(raw, src)


def from_json(text: str, source: str = "checkpoint") -> Config:
    return from_dict(json.loads(text), source)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
