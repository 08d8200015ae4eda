"""Backbones without a classifier head: ResNet-18/34/50/101 in the torchvision layout (key
names), and ``convnet4``, a small plain CNN for CPU demos.

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
RESNETS = tuple(_BUILDERS)
CONVNET4_WIDTHS = (32, 64, 128, 256)
ARCHS = (*RESNETS, "convnet4")


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    stage = nn.Sequential()
    stage.add_module("conv", conv)
    stage.add_module("bn", nn.BatchNorm2d(c_out))
    stage.add_module("relu", nn.ReLU(inplace=True))
    return stage


class ConvNet4(nn.Module):
    """Four 3×3 conv–BN–ReLU stages (widths 32, 64, 128, 256), 2×2 max-pool between them,
    global average pool. ~0.4 M parameters: the backbone of the CPU demo, where a ResNet
    learns too slowly on 2 cores to show anything in minutes (BENCHMARKS.md).

    Keys: ``stage{1..4}.conv.weight``, ``stage{1..4}.bn.*``. Not a torchvision model; only
    sslctl loads it (detectron2 conversion refuses it).
    """

    def __init__(self) -> None:
        super().__init__()
        w1, w2, w3, w4 = CONVNET4_WIDTHS
        self.stage1 = _conv_bn_relu(3, w1)
        self.stage2 = _conv_bn_relu(w1, w2)
        self.stage3 = _conv_bn_relu(w2, w3)
        self.stage4 = _conv_bn_relu(w3, w4)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stage1(x))
        x = self.pool(self.stage2(x))
        x = self.pool(self.stage3(x))
        x = self.stage4(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def feature_dim(arch: str) -> int:
    _check(arch)
    return CONVNET4_WIDTHS[-1] if arch == "convnet4" else _BUILDERS[arch][1]


def _check(arch: str) -> None:
    if arch not in ARCHS:
        raise UserError(f"unknown backbone '{arch}' (known: {', '.join(ARCHS)})")


def build_backbone(
    arch: str, small_stem: bool = False, zero_init_residual: bool = False
) -> nn.Module:
    """A randomly initialised backbone: a torchvision ResNet with ``fc = Identity``, or
    :class:`ConvNet4`.

    ``small_stem`` replaces the ResNet's 7×7/2 stem and max-pool with a 3×3/1 convolution
    (CIFAR-style), keeping the key ``conv1.weight`` so that the state dict still uses
    torchvision names. It has no meaning for ``convnet4`` (an error). ``zero_init_residual``
    starts each residual branch's last BN weight at 0 (torchvision's option; SimSiam's code).
    """
    _check(arch)
    if arch == "convnet4":
        if small_stem:
            raise UserError("model.small_stem applies to ResNets only; convnet4 has no stem")
        return ConvNet4()
    net = torchvision_resnet(arch, small_stem, zero_init_residual)
    net.fc = nn.Identity()  # type: ignore[assignment]
    return net


def torchvision_resnet(
    arch: str, small_stem: bool = False, zero_init_residual: bool = False
) -> models.ResNet:
    """``torchvision.models.<arch>()``, randomly initialised, with its fc head; with
    ``small_stem``, the 3×3/1 stem without max-pool (``build_backbone``'s). The one place a
    ResNet is built: backbones and the reference networks extracted weights must load into."""
    net = _BUILDERS[arch][0](weights=None, zero_init_residual=zero_init_residual)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()  # type: ignore[assignment]
    return net


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """(arch, small_stem) of a backbone state dict: a torchvision-named ResNet (from its block
    counts) or a ConvNet4 (from its stage widths)."""
    if "stage1.conv.weight" in state:
        absent = [
            f"stage{i}.conv.weight" for i in (2, 3, 4) if f"stage{i}.conv.weight" not in state
        ]
        if absent:
            raise UserError(f"not a complete convnet4 backbone: {', '.join(absent)} missing")
        widths = tuple(int(state[f"stage{i}.conv.weight"].shape[0]) for i in (1, 2, 3, 4))
        if widths != CONVNET4_WIDTHS or "stage5.conv.weight" in state:
            raise UserError(
                f"unsupported plain-CNN layout: stage widths {widths} (convnet4 has "
                f"{CONVNET4_WIDTHS})"
            )
        return "convnet4", False
    if "conv1.weight" not in state or "layer4.0.conv1.weight" not in state:
        raise UserError(
            "no backbone found (expected a ResNet's conv1.weight, layer4.0.conv1.weight… or "
            "convnet4's stage1.conv.weight…)"
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


def load_backbone(state: dict[str, torch.Tensor], source: str) -> tuple[nn.Module, str]:
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
