"""Building a configuration from a profile's mapping: every section, key, type, range and choice
checked (``from_dict``, ``linear_from_dict``), then the rules across keys (``validate``,
``validate_linear``). Errors are UserErrors that name the key and the profile."""

from __future__ import annotations

import contextlib
import difflib
import math
import typing
from dataclasses import fields
from typing import Any

from sslctl import UserError
from sslctl.config.keys import CHOICES, KINDS, QUOTE_LIMIT, RANGES
from sslctl.config.schema import Config, LinearConfig


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
        with contextlib.suppress(ValueError):  # YAML 1.1 reads "1e-6" as a string
            return float(value)
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
