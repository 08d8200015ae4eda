"""ResNet-18/34/50/101 backbones in the torchvision layout (key names), without the fc head.

``forward`` returns the global-average-pooled features of the last stage (n×feature_dim).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models

from sslctl import UserError

# An explicit table, no registry (DESIGN convention 3).
_BUILDERS: dict[str, tuple[Callable[..., models.ResNet], int]] = {
    "resnet18": (models.resnet18, 512),
    "resnet34": (models.resnet34, 512),
    "resnet50": (models.resnet50, 2048),
    "resnet101": (models.resnet101, 2048),
}
ARCHS = tuple(_BUILDERS)


def feature_dim(arch: str) -> int:
    _check(arch)
    return _BUILDERS[arch][1]


def _check(arch: str) -> None:
    if arch not in _BUILDERS:
        raise UserError(f"unknown backbone '{arch}' (known: {', '.join(ARCHS)})")


def build_backbone(arch: str, small_stem: bool = False) -> models.ResNet:
    """A randomly initialised torchvision ResNet with ``fc = Identity``.

    ``small_stem`` replaces the 7×7/2 stem and max-pool with a 3×3/1 convolution (CIFAR-style),
    keeping the key ``conv1.weight`` so that the state dict still uses torchvision names.
    """
    _check(arch)
    net = _BUILDERS[arch][0](weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()  # type: ignore[assignment]
    net.fc = nn.Identity()  # type: ignore[assignment]
    return net


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """(arch, small_stem) of a torchvision-named ResNet state dict, from its block counts."""
    if "conv1.weight" not in state or "layer4.0.conv1.weight" not in state:
        raise UserError(
            "no ResNet backbone found (expected keys conv1.weight, layer4.0.conv1.weight…)"
        )
    blocks = {
        i: len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4)
    }
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in state)
    counts = (blocks[1], blocks[2], blocks[3], blocks[4])
    table = {
        ((2, 2, 2, 2), False): "resnet18",
        ((3, 4, 6, 3), False): "resnet34",
        ((3, 4, 6, 3), True): "resnet50",
        ((3, 4, 23, 3), True): "resnet101",
    }
    arch = table.get((counts, bottleneck))
    if arch is None:
        raise UserError(f"unsupported ResNet layout: blocks {counts}, bottleneck={bottleneck}")
    small = tuple(state["conv1.weight"].shape[-2:]) == (3, 3)
    return arch, small


def load_backbone(state: dict[str, torch.Tensor], source: str) -> tuple[models.ResNet, str]:
    """Build the matching backbone and load ``state`` strictly (fc.* ignored). Returns (net, arch)."""
    arch, small = infer_arch(state)
    net = build_backbone(arch, small_stem=small)
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(body, strict=False)
    except RuntimeError as e:
        raise UserError(
            f"{source}: weights do not fit {arch}: {str(e).splitlines()[-1].strip()}"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{source}: weights do not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return net, arch
