"""A backbone as torchvision expects it: key names, no fc, and proof that it loads.

The written file is read back and loaded into a fresh torchvision ResNet of the matching depth
before it replaces the output path, so a file that exists is a file that loads with only
``fc.*`` missing. A ``convnet4`` backbone (not a torchvision model) is checked the same way
against :class:`sslctl.backbones.ConvNet4`, with nothing missing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sslctl import UserError, checkpoint, files, last_line
from sslctl.backbones import ConvNet4, infer_arch, torchvision_resnet

FORMAT = "sslctl-backbone"
FORMATS = ("safetensors", "torchvision")
_SUFFIX_FORMAT = {".safetensors": "safetensors", ".pth": "torchvision", ".pt": "torchvision"}
# The head torchvision's ResNet has and a backbone does not: the only keys allowed to be missing.
HEAD_KEYS = ("fc.weight", "fc.bias")


@dataclass(frozen=True)
class CheckedBackbone:
    """A backbone state dict in its reference network's order (torchvision's for ResNets),
    complete except for the fc head (convnet4 has none)."""

    state: OrderedDict[str, torch.Tensor]
    arch: str
    small_stem: bool
    counters_added: int  # BN num_batches_tracked buffers absent from the source, set to 0


def reference_net(arch: str, small_stem: bool) -> nn.Module:
    """The network an extracted ``arch`` backbone must load into (with its head, if any)."""
    return ConvNet4() if arch == "convnet4" else torchvision_resnet(arch, small_stem)


def head_keys(arch: str) -> tuple[str, ...]:
    """Keys of ``reference_net(arch)`` a backbone lacks: torchvision's fc, none for convnet4."""
    return () if arch == "convnet4" else HEAD_KEYS


def loader_name(arch: str) -> str:
    """What ``check_loads`` loads into, as a user would write it."""
    return "sslctl.backbones.ConvNet4()" if arch == "convnet4" else f"torchvision.models.{arch}()"


def as_torchvision(state: dict[str, torch.Tensor], source: str) -> CheckedBackbone:
    """Order ``state`` like its reference network (torchvision's ResNet, or ConvNet4) and check
    it fills every key but the head with the right shape.

    BN's ``num_batches_tracked`` counters missing from old files are added as 0 (what PyTorch
    itself assumes for such files); missing weights or running statistics are an error.
    """
    arch, small = infer_arch(state)
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation cost
        reference = reference_net(arch, small).state_dict()
    body = {k: v for k, v in reference.items() if k not in head_keys(arch)}
    missing = [k for k in body if k not in state and not k.endswith("num_batches_tracked")]
    extra = sorted(set(state) - set(body))
    if missing or extra:
        raise UserError(
            f"{source}: not a complete {arch} backbone: missing {_few(missing)}, "
            f"unexpected {_few(extra)}"
        )
    bad = [k for k in body if k in state and state[k].shape != body[k].shape]
    if bad:
        k = bad[0]
        raise UserError(
            f"{source}: {k} has shape {tuple(state[k].shape)}, {arch} needs "
            f"{tuple(body[k].shape)} ({len(bad)} tensors differ)"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    added = 0
    for k, ref in body.items():
        if k in state:
            out[k] = state[k].detach().cpu().contiguous()
        else:
            out[k] = torch.zeros(ref.shape, dtype=ref.dtype)
            added += 1
    return CheckedBackbone(out, arch, small, added)


def _few(keys: list[str]) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:3]) + (f" … ({len(keys)} in all)" if len(keys) > 3 else "")


def check_loads(state: dict[str, torch.Tensor], arch: str, small_stem: bool, what: str) -> None:
    """Load into a fresh reference network (torchvision's ResNet, or ConvNet4); only the head
    (``fc.*``; nothing for convnet4) may be missing, nothing unexpected."""
    with torch.device("meta"):  # skip the random initialisation the load overwrites anyway
        net = reference_net(arch, small_stem)
    net = net.to_empty(device="cpu")
    name = loader_name(arch)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"{what}: does not load into {name}: {last_line(e)}") from None
    head = head_keys(arch)
    if sorted(result.missing_keys) != sorted(head) or result.unexpected_keys:
        expected = f"only {', '.join(head)} missing" if head else "nothing missing"
        raise UserError(
            f"{what}: {name} reports missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]} (expected {expected})"
        )


def output_format(output: Path, fmt: str | None) -> str:
    """The format asked for, or the one the output's suffix names; contradictions are errors."""
    by_suffix = _SUFFIX_FORMAT.get(output.suffix.lower())
    if fmt is None:
        if by_suffix is None:
            raise UserError(
                f"{output}: cannot tell the format from the suffix; name it .safetensors or .pth, "
                f"or pass --format ({'|'.join(FORMATS)})"
            )
        return by_suffix
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if by_suffix is not None and by_suffix != fmt:
        raise UserError(
            f"{output}: the suffix {output.suffix} says {by_suffix} but --format is {fmt}; "
            "change one of them"
        )
    return fmt


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: ``torch.equal`` calls NaN unequal to itself, which would blame the disk
    for weights that are NaN (read_backbone refuses those first; this keeps the check honest)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def write(output: Path, bb: CheckedBackbone, fmt: str, meta: dict[str, str]) -> None:
    """Write atomically; the temp file is read back and load-checked before it is renamed."""

    def _write(tmp: str) -> None:
        if fmt == "safetensors":
            checkpoint.write_bytes(tmp, checkpoint.safetensors_bytes(dict(bb.state), meta))
            back, _ = checkpoint.load_safetensors(Path(tmp))
        else:
            torch.save(bb.state, tmp)
            back = torch.load(tmp, map_location="cpu", weights_only=True)
        what = f"{output} (as written)"
        if back.keys() != bb.state.keys() or any(
            not _same_bits(back[k], v) for k, v in bb.state.items()
        ):
            raise UserError(f"{what}: reads back different from what was written; disk problem?")
        check_loads(back, bb.arch, bb.small_stem, what)

    try:
        files.atomic_write(output, _write)
    except OSError as e:
        raise UserError(f"{output}: cannot write ({e.strerror or e})") from None
