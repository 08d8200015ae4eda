"""The options of ``sslctl eval-reid`` and their defaults, record and hash.

Defaults of the flip fusion, precision, AP definition and denominator depend on the layout
(``layout_defaults``): SYSU-30k reproduces its reference script, every other layout the choices
of torchreid and fast-reid; ``--compat`` names one family at once. ``options_hash`` names a
run's results-<hash>.json after the options that can change its numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sslctl.eval.command import CallerPaths
from sslctl.eval.reid.metrics import DEFAULT_MEM_BUDGET

PRECISIONS = ("auto", "bf16", "fp32")
# One switch per family of reference implementations (REID.md "Presets").
COMPAT = {
    "triplet-script": {"ap": "trapezoid", "denominator": "all", "flip_fusion": "legacy-triplet"},
    "torchreid": {"ap": "standard", "denominator": "valid", "flip_fusion": "sum"},
}
# The paper's evaluation (wanggrun/triplet Self-Supervised-ReID/test_sysu_combine.py, which is
# SYSU-30k's own self-supervised script): fp32 features, normalise-first fusion, CMC and mAP
# summed over valid queries but divided by all of them, trapezoid AP.
SYSU30K_REFERENCE = {
    "flip_fusion": "legacy-triplet",
    "precision": "fp32",
    "ap": "trapezoid",
    "denominator": "all",
}
# Every other layout: torchreid / fast-reid choices; "auto" precision is then bf16 on CUDA.
DEFAULTS = {"flip_fusion": "sum", "precision": "auto", "ap": "standard", "denominator": "valid"}
# Options that cannot change the numbers: left out of the hash naming results-<hash>.json, so
# that reruns differing only in these overwrite each other's file instead of piling up.
NOT_HASHED = (
    "out",
    "workers",
    "batch_size",
    "mem_budget",
    "recompute",
    "cmc_log_x",
    "trust_pickle",
    "device",  # the numbers follow the precision (an option, hashed), not the device's name
)


@dataclass(frozen=True)
class EvalReidOptions(CallerPaths):
    weights: Path | None = None  # checkpoint, extracted backbone or torchvision .pth
    part: str = "online"
    data: Path | None = None
    query: Path | None = None
    gallery: Path | None = None
    layout: str | None = None
    query_features: Path | None = None
    gallery_features: Path | None = None
    out: Path = Path("runs/reid")
    flip: bool = True
    flip_fusion: str | None = None  # None: from --compat, else the layout's default
    precision: str = "auto"  # the layout's default: sysu30k fp32; else bf16 on CUDA, fp32 on CPU
    batch_size: int = 128
    workers: int | None = None  # None: min(8, CPUs)
    device: str = "auto"
    ap: str | None = None
    denominator: str | None = None
    ties: str = "pessimistic"
    metric: str = "cosine"
    max_rank: int = 50
    mem_budget: int = DEFAULT_MEM_BUDGET
    junk_identical: bool | None = None  # None: on for imagefolder only
    junk_classes: tuple[str, ...] = ("-1",)
    camera_regex: str | None = None
    cache_dtype: str = "fp32"
    recompute: bool = False
    compat: str | None = None
    cmc_log_x: bool = False  # logarithmic rank axis in cmc.png
    trust_pickle: bool = False  # allow a .pth that needs full unpickling (runs code in it)


def layout_defaults(layout: str | None) -> dict[str, str]:
    """Default fusion, precision, AP and denominator for a layout (flags and --compat win).

    sysu30k reproduces the reference script's numbers; Market-1501 and ImageFolder sets keep
    the choices of torchreid and fast-reid, against which such numbers are usually compared.
    """
    return dict(SYSU30K_REFERENCE if layout == "sysu30k" else DEFAULTS)


def options_record(o: EvalReidOptions) -> dict[str, Any]:
    """The resolved options as JSON values (paths absolute, so the record does not depend on
    the directory the command ran in)."""
    record: dict[str, Any] = {}
    for f in fields(o):
        value = getattr(o, f.name)
        if isinstance(value, Path):
            value = os.path.abspath(value)
        elif isinstance(value, tuple):
            value = list(value)
        record[f.name] = value
    return record


def options_hash(record: dict[str, Any]) -> str:
    """First 10 hex digits of the sha256 of the canonical JSON of the options that can change
    the numbers (all but NOT_HASHED): the name of this run's results-<hash>.json."""
    keyed = {k: v for k, v in record.items() if k not in NOT_HASHED}
    canonical = json.dumps(keyed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]
