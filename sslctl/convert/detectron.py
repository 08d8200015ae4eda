"""torchvision ResNet weights → a detectron2 backbone pickle (SPEC §5); the fine-tuning configs
are in ``sslctl.convert.detectron_configs``.

Key map: keys outside ``layerN`` go under ``stem.``; ``layerN`` → ``res{N+1}``; ``bnK`` →
``convK.norm``; ``downsample.0`` → ``shortcut``; ``downsample.1`` → ``shortcut.norm``.

BN ``num_batches_tracked`` counters are dropped, as detectron2's own pycls import does
(``DetectionCheckpointer._load_file``): its FrozenBatchNorm2d has no such buffer (they would be
reported as unused keys), and ``nn.SyncBatchNorm`` fills an absent counter itself when loading a
plain dict; the counter only matters for ``momentum=None``, which detectron2 never uses. The running
mean and variance must be present: FrozenBatchNorm2d silently substitutes 0 and 1 for missing
ones (``_load_from_state_dict``), which would quietly break a frozen backbone.

The pickle references only ``numpy.ndarray`` and ``numpy.dtype``: NumPy 2 pickles arrays through
``numpy._core.multiarray._reconstruct``, a module NumPy 1 does not have; rebuilding each array as
an empty ``numpy.ndarray`` restored by its own ``__setstate__`` reads the same under both.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from sslctl import UserError, files

AUTHOR = "sslctl"
PICKLE_PROTOCOL = 4  # readable by every Python 3 that detectron2 supports
# What the pickle may name, and so all an unpickler of it ever imports.
PICKLE_GLOBALS = frozenset({("numpy", "ndarray"), ("numpy", "dtype")})

# (bottleneck blocks?, blocks per stage): the layouts detectron2's ResNet builds by depth.
LAYOUTS: dict[str, tuple[bool, tuple[int, int, int, int]]] = {
    "resnet18": (False, (2, 2, 2, 2)),
    "resnet34": (False, (3, 4, 6, 3)),
    "resnet50": (True, (3, 4, 6, 3)),
    "resnet101": (True, (3, 4, 23, 3)),
}
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def detectron2_name(key: str) -> str:
    """The detectron2 name of one torchvision backbone key (SPEC §5 map)."""
    parts = key.split(".")
    if parts[0].startswith("layer") and parts[0][5:].isdigit():
        parts[0] = f"res{int(parts[0][5:]) + 1}"
    else:
        parts.insert(0, "stem")
    out: list[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p.startswith("bn") and p[2:].isdigit():
            out += [f"conv{p[2:]}", "norm"]
        elif p == "downsample" and i + 1 < len(parts) and parts[i + 1] in ("0", "1"):
            out += ["shortcut"] if parts[i + 1] == "0" else ["shortcut", "norm"]
            i += 1
        else:
            out.append(p)
        i += 1
    return ".".join(out)


def expected_names(arch: str) -> list[str]:
    """Every detectron2 backbone tensor name for ``arch``, built from its block counts alone."""
    if arch not in LAYOUTS:
        raise UserError(
            f"detectron2 has no ResNet layout for '{arch}' (known: {', '.join(LAYOUTS)})"
        )
    bottleneck, blocks = LAYOUTS[arch]
    convs = 3 if bottleneck else 2

    def conv(prefix: str) -> list[str]:
        return [f"{prefix}.weight"] + [f"{prefix}.norm.{t}" for t in _BN_TENSORS]

    names = conv("stem.conv1")
    for stage, n in enumerate(blocks, start=2):
        for b in range(n):
            # The first block changes the width (bottleneck: every stage; basic: res3 on, where
            # it also halves the resolution), so it alone has a projection shortcut.
            if b == 0 and (bottleneck or stage > 2):
                names += conv(f"res{stage}.{b}.shortcut")
            for c in range(1, convs + 1):
                names += conv(f"res{stage}.{b}.conv{c}")
    return names


def to_detectron2(state: dict[str, torch.Tensor], arch: str, source: str) -> dict[str, np.ndarray]:
    """Rename and convert: each tensor mapped once, the names exactly ``expected_names(arch)``."""
    kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    renamed: dict[str, str] = {}
    for k in kept:
        new = detectron2_name(k)
        if new in renamed:
            raise UserError(f"{source}: {k} and {renamed[new]} would both become {new}")
        renamed[new] = k
    expected = expected_names(arch)
    missing = [n for n in expected if n not in renamed]
    extra = sorted(set(renamed) - set(expected))
    if missing or extra:
        raise UserError(
            f"{source}: does not match detectron2's {arch} backbone: missing {_few(missing)}, "
            f"unexpected {_few([renamed[n] for n in extra])}"
        )
    out = {}
    for name in expected:
        t = kept[renamed[name]].detach().cpu()
        # detectron2 trains in float32; NumPy has no bfloat16.
        out[name] = np.ascontiguousarray(t.float().numpy() if t.is_floating_point() else t.numpy())
    return out


def _few(keys: list[str]) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:3]) + (f" … ({len(keys)} in all)" if len(keys) > 3 else "")


def _reduce_ndarray(a: np.ndarray) -> tuple[Any, ...]:
    # ndarray.__reduce__ gives (<_reconstruct in numpy._core or numpy.core>, args, state); keep
    # its state (shape, dtype, order, raw bytes) and rebuild from an empty array instead.
    state = a.__reduce__()[2]
    return (np.ndarray, ((0,), a.dtype), state)


class _PortablePickler(pickle.Pickler):
    dispatch_table = {**copyreg.dispatch_table, np.ndarray: _reduce_ndarray}


def dump(obj: Any, fh: BinaryIO) -> None:
    """Pickle with arrays written so that NumPy 1.x and 2.x both read them."""
    _PortablePickler(fh, protocol=PICKLE_PROTOCOL).dump(obj)


class _AuditUnpickler(pickle.Unpickler):
    """Reads back our own pickle, refusing any global outside PICKLE_GLOBALS."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def load(data: bytes) -> Any:
    return _AuditUnpickler(io.BytesIO(data), encoding="latin1").load()


def write_pickle(output: Path, model: dict[str, np.ndarray]) -> None:
    """Atomic write of detectron2's format; the bytes are read back and compared first."""
    obj = {"model": model, "__author__": AUTHOR, "matching_heuristics": True}

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            dump(obj, fh)
        back = load(Path(tmp).read_bytes())["model"]
        same = back.keys() == model.keys() and all(
            back[k].dtype == v.dtype and np.array_equal(back[k], v) for k, v in model.items()
        )
        if not same:
            raise UserError(f"{output}: reads back different from what was written; disk problem?")

    try:
        files.atomic_write(output, _write)
    except OSError as e:
        raise UserError(f"{output}: cannot write ({e.strerror or e})") from None
