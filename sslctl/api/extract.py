"""``extract``: the backbone alone, in torchvision's layout, as safetensors or a .pth state dict."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sslctl import UserError
from sslctl.convert import extract as ex
from sslctl.convert.weights import read_backbone

UNKNOWN = "unknown"


@dataclass(frozen=True)
class ExtractResult:
    output: Path
    format: str  # safetensors | torchvision
    arch: str
    small_stem: bool
    part: str
    source: str  # the file actually read (a run directory resolves to its newest valid checkpoint)
    source_kind: str  # sslctl-checkpoint | sslctl-backbone | torchvision | reference-mmcv
    method: str
    step: str
    tensors: int
    parameters: int  # learnable values (conv and BN weights and biases)
    counters_added: int  # BN num_batches_tracked absent from the source, written as 0
    # what the load check's network lacks on loading (the name predates convnet4, which is
    # checked in sslctl's ConvNet4 and lacks nothing)
    missing_in_torchvision: tuple[str, ...]
    checked_with: str  # the network the written file was load-checked in


def extract(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    part: str = "online",
    fmt: str | None = None,
    trust_pickle: bool = False,
) -> ExtractResult:
    """Read ``source`` (any input read_backbone accepts), check it, write ``output`` atomically.

    ``fmt``: "safetensors" or "torchvision" (a plain ``torch.save`` state dict); None picks it
    from the suffix. The written file is read back and loaded into torchvision (sslctl's
    ConvNet4 for convnet4) before it lands.
    """
    output = Path(output)
    fmt = ex.output_format(output, fmt)
    weights = read_backbone(Path(source), part, trust_pickle)
    origin = weights.meta.get("source", str(source))
    if Path(origin).resolve() == Path(output).resolve():
        raise UserError(f"{output}: is the input file; choose another output path")
    bb = ex.as_torchvision(weights.state, origin)
    meta = {
        "format": ex.FORMAT,
        "source": origin,
        "source_kind": weights.source_kind,
        "method": weights.meta.get("method", UNKNOWN),
        "arch": bb.arch,
        "small_stem": str(bb.small_stem).lower(),
        "part": part,
        "step": weights.meta.get("step", UNKNOWN),
    }
    ex.write(Path(output), bb, fmt, meta)
    learnable = ("weight", "bias")
    return ExtractResult(
        output=Path(output),
        format=fmt,
        arch=bb.arch,
        small_stem=bb.small_stem,
        part=part,
        source=origin,
        source_kind=weights.source_kind,
        method=meta["method"],
        step=meta["step"],
        tensors=len(bb.state),
        parameters=sum(v.numel() for k, v in bb.state.items() if k.rsplit(".", 1)[-1] in learnable),
        counters_added=bb.counters_added,
        missing_in_torchvision=ex.head_keys(bb.arch),
        checked_with=ex.loader_name(bb.arch),
    )
