"""``convert-detectron``: a backbone as a detectron2 pickle, optionally with fine-tuning configs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sslctl import UserError, as_path
from sslctl.convert import detectron as d2
from sslctl.convert import detectron_configs as d2cfg
from sslctl.convert.extract import as_torchvision
from sslctl.convert.weights import read_backbone


@dataclass(frozen=True)
class ConvertDetectronResult:
    output: Path
    arch: str
    source: str  # the file actually read
    source_kind: str
    tensors: int  # every detectron2 backbone tensor, BN running statistics included
    counters_dropped: int  # BN num_batches_tracked, which detectron2 does not load
    configs: tuple[Path, ...]  # YAML configs and train_net.py, when asked for
    commands: tuple[str, ...]  # how to start each fine-tuning run


def convert_detectron(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    part: str = "online",
    configs: str | os.PathLike[str] | None = None,
    configs_style: str = "reference",
    trust_pickle: bool = False,
) -> ConvertDetectronResult:
    """Convert ``source`` (any input read_backbone accepts) to ``output`` (.pkl), atomically.

    The converted names are checked against detectron2's full backbone parameter list for the
    architecture: nothing missing, nothing extra. ``configs``: a directory for the COCO and VOC
    R50-C4 configs (SPEC §5) that point at ``output``; ``configs_style``: "reference" (the
    paper's code as committed) or "moco" (detectron2's step schedule, VOC 24k);
    ``trust_pickle``: allow a .pth that needs full unpickling (runs code stored in it).
    """
    d2cfg.check_style(configs_style)
    output = Path(output)
    if output.suffix != ".pkl":
        raise UserError(
            f"{output}: detectron2 reads converted weights only from a .pkl file; name it *.pkl"
        )
    weights = read_backbone(Path(source), part, trust_pickle)
    configs = as_path(configs)
    origin = weights.meta.get("source", str(source))
    bb = as_torchvision(weights.state, origin)
    if bb.arch not in d2.LAYOUTS:
        raise UserError(
            f"{origin}: a {bb.arch} backbone (sslctl's small demo CNN, not a ResNet); detectron2 "
            f"has no such backbone, only {', '.join(d2.LAYOUTS)} convert"
        )
    if bb.small_stem:
        raise UserError(
            f"{origin}: this {bb.arch} has the 3x3 small-image stem; detectron2's ResNet stem is "
            "7x7 with max-pool, so only backbones pre-trained with the standard stem convert"
        )
    if configs is not None:
        d2cfg.config_depth(bb.arch)  # refuse before writing anything
    model = d2.to_detectron2(bb.state, bb.arch, origin)
    d2.write_pickle(output, model)
    files: list[Path] = []
    commands: tuple[str, ...] = ()
    if configs is not None:
        files = d2cfg.write_configs(Path(configs), output, bb.arch, configs_style)
        stems = d2cfg.run_stems(configs_style)
        commands = tuple(d2cfg.train_command(Path(configs).resolve(), s) for s in stems)
    return ConvertDetectronResult(
        output=output,
        arch=bb.arch,
        source=origin,
        source_kind=weights.source_kind,
        tensors=len(model),
        counters_dropped=sum(k.endswith("num_batches_tracked") for k in bb.state),
        configs=tuple(files),
        commands=commands,
    )
