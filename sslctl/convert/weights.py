"""Read a ResNet backbone state dict (torchvision key names) from any supported weights file.

Supported inputs:
- sslctl checkpoints (a ``step_*.safetensors`` file, a run or checkpoints directory, ``…/last``):
  the ``online`` (default) or ``target`` backbone;
- extracted backbones (safetensors with torchvision key names);
- plain torchvision state dicts (.pth/.pt), with or without ``fc.*``;
- the reference implementation's mmcv-style .pth: ``{"state_dict": {"backbone.…": …}}``
  (the same tensors also appear under ``online_net.0.``).
Pickles are only ever read with ``weights_only=True``: a file that needs to execute code is refused.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sslctl import UserError, checkpoint

PARTS = ("online", "target")


@dataclass(frozen=True)
class BackboneWeights:
    state: dict[str, torch.Tensor]  # torchvision key names, no fc
    source_kind: str  # sslctl-checkpoint | sslctl-backbone | torchvision | reference-mmcv
    meta: dict[str, str]  # method, arch, step … where the source says


def _is_ours(path: Path) -> bool:
    return path.is_dir() or (path.name == "last" and path.parent.is_dir()) or (
        path.suffix == ".safetensors" and path.name.startswith("step_")
    )


def read_backbone(path: Path, part: str = "online") -> BackboneWeights:
    if part not in PARTS:
        raise UserError(f"--part must be one of {', '.join(PARTS)}, got '{part}'")
    if not path.exists() and not (path.name == "last" and path.parent.is_dir()):
        raise UserError(f"{path}: no such file or directory")
    if _is_ours(path):
        ck = checkpoint.resolve(path)
        state, meta = checkpoint.load_safetensors(ck.weights, prefix=f"{part}.backbone.")
        if not state:
            raise UserError(f"{ck.weights}: no '{part}.backbone.*' tensors inside")
        return BackboneWeights(state, "sslctl-checkpoint", {**meta, "source": str(ck.weights)})
    if path.suffix == ".safetensors":
        state, meta = checkpoint.load_safetensors(path)
        if any(k.startswith(f"{part}.backbone.") for k in state):
            state = {k[len(part) + 10 :]: v for k, v in state.items() if k.startswith(f"{part}.backbone.")}
            return BackboneWeights(state, "sslctl-checkpoint", {**meta, "source": str(path)})
        return BackboneWeights(_strip_fc(state), meta.get("format", "sslctl-backbone"), {**meta, "source": str(path)})
    if part != "online":
        raise UserError(f"{path}: --part {part} is only available for sslctl checkpoints")
    return _read_pickle(path)


def _strip_fc(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _read_pickle(path: Path) -> BackboneWeights:
    """A .pth read with weights_only=True: plain torchvision or reference mmcv layout."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise UserError(
            f"{path}: refused: the file needs to execute pickled code to load ({first[:160]}); "
            "only plain tensor state dicts are read"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"{path}: not a readable PyTorch weights file ({msg[:160]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict, found {type(obj).__name__}")
    meta = {"source": str(path)}
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        for prefix in ("backbone.", "online_net.0.", "module.backbone.", "module.encoder_q."):
            sub = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            if sub:
                return BackboneWeights(_tensors(_strip_fc(sub), path), "reference-mmcv", meta)
        obj = sd
    state = _tensors(checkpoint.strip_prefixes(obj), path)
    if "conv1.weight" not in state:
        raise UserError(f"{path}: no backbone inside (no conv1.weight, backbone.* or online_net.0.* keys)")
    return BackboneWeights(_strip_fc(state), "torchvision", meta)


def _tensors(d: dict, path: Path) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not out:
        raise UserError(f"{path}: no tensors inside")
    return out
