"""Read a backbone state dict (torchvision key names for ResNets; ``stage*`` for convnet4) from
any supported weights file.

Supported inputs:
- sslctl checkpoints (a ``step_*.safetensors`` file, a run or checkpoints directory, ``…/last``):
  the ``online`` (default) or ``target`` backbone;
- extracted backbones (safetensors with torchvision key names);
- plain torchvision state dicts (.pth/.pt), with or without ``fc.*``;
- the reference implementation's mmcv-style .pth: ``{"state_dict": {"backbone.…": …}}``
  (the same tensors also appear under ``online_net.0.``; the target under ``target_net.0.``).
Pickles are only ever read with ``weights_only=True``: a file that needs to execute code is refused.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sslctl import UserError, checkpoint, log

PARTS = ("online", "target")

# Where the reference (mmcv/OpenSelfSup) and its relatives keep each part, most specific first.
_PICKLE_PREFIXES = {
    "online": ("backbone.", "online_net.0.", "module.backbone.", "module.encoder_q."),
    "target": ("target_net.0.", "module.target_net.0.", "module.encoder_k."),
}
# mmcv and many training scripts nest the weights one level down.
_CONTAINERS = ("state_dict", "model", "model_state")


@dataclass(frozen=True)
class BackboneWeights:
    state: dict[str, torch.Tensor]  # torchvision key names, no fc
    source_kind: str  # sslctl-checkpoint | sslctl-backbone | torchvision | reference-mmcv
    meta: dict[str, str]  # method, arch, step … where the source says


def _is_ours(path: Path) -> bool:
    return (
        path.is_dir()
        or (path.name == "last" and path.parent.is_dir())
        or (path.suffix == ".safetensors" and path.name.startswith("step_"))
    )


def read_backbone(path: Path, part: str = "online", trust_pickle: bool = False) -> BackboneWeights:
    """The backbone in ``path``; ``trust_pickle`` allows full unpickling (runs code in the file)."""
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
        return _read_safetensors(path, part)
    if path.suffix == ".pkl":
        raise UserError(
            f"{path}: a .pkl (detectron2 format) is an output of convert-detectron, not an input; "
            "use the .safetensors or .pth it was made from"
        )
    return _read_pickle(path, part, trust_pickle)


def _read_safetensors(path: Path, part: str) -> BackboneWeights:
    state, meta = checkpoint.load_safetensors(path)
    prefix = f"{part}.backbone."
    if any(k.startswith(prefix) for k in state):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        return BackboneWeights(sub, "sslctl-checkpoint", {**meta, "source": str(path)})
    if part != "online" or any(k.startswith(("online.", "target.")) for k in state):
        raise UserError(f"{path}: no '{prefix}*' tensors inside")
    if not state:
        raise UserError(f"{path}: no tensors inside")
    kind = meta.get("format", "sslctl-backbone")
    return BackboneWeights(_strip_fc(state), kind, {**meta, "source": str(path)})


def _strip_fc(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _load_pickle(path: Path, trust_pickle: bool = False) -> Any:
    """``torch.load(weights_only=True)``, with its failures turned into one clear line.

    ``trust_pickle`` is the only way to read anything else: it warns, then unpickles fully.
    """
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        # torch.save writes a zip archive (or, before PyTorch 1.6, a pickle with a PROTO opcode).
        raise UserError(f"{path}: not a PyTorch weights file (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it reads anyway
            warnings.simplefilter("ignore", UserWarning)
            if trust_pickle:
                log.warn(
                    f"--trust-pickle: unpickling {path} without restrictions; any code stored "
                    "in it runs now with your permissions"
                )
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds more than tensors"
        raise UserError(
            f"{path}: refused: a safe load (weights_only) cannot read it ({what}); only plain "
            "tensor state dicts are read, never code stored in a file "
            "(re-save with torch.save(model.state_dict()), or pass --trust-pickle if you trust "
            "the file's author)"
        ) from None
    except Exception as e:  # a corrupt file surfaces as almost any error type (KeyError, EOFError…)
        why = _first_line(str(e)) or e.__class__.__name__
        raise UserError(f"{path}: not a readable PyTorch weights file ({why})") from None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:160] if lines else ""


def _read_pickle(path: Path, part: str, trust_pickle: bool = False) -> BackboneWeights:
    """A .pth read with weights_only=True: plain torchvision or reference mmcv layout."""
    obj = _load_pickle(path, trust_pickle)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict, found {type(obj).__name__}")
    meta = {"source": str(path), **_mmcv_meta(obj.get("meta"))}
    sd = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), dict)), obj)
    for prefix in _PICKLE_PREFIXES[part]:
        sub = {
            k[len(prefix) :]: v
            for k, v in sd.items()
            if isinstance(k, str) and k.startswith(prefix)
        }
        if sub:
            return BackboneWeights(_tensors(_strip_fc(sub), path), "reference-mmcv", meta)
    if part != "online":
        raise UserError(
            f"{path}: no target network inside (looked for {', '.join(_PICKLE_PREFIXES[part])}); "
            "--part target needs an sslctl checkpoint or a reference checkpoint with target_net.0.*"
        )
    state = _tensors(checkpoint.strip_prefixes(sd), path)
    if "conv1.weight" not in state and "stage1.conv.weight" not in state:
        raise UserError(
            f"{path}: no backbone inside (no conv1.weight, stage1.conv.weight, backbone.* or "
            "online_net.0.* keys)"
        )
    return BackboneWeights(_strip_fc(state), "torchvision", meta)


def _mmcv_meta(meta: object) -> dict[str, str]:
    """mmcv's checkpoint ``meta`` records ``iter`` (optimizer steps) and ``epoch``."""
    if not isinstance(meta, dict):
        return {}
    out = {}
    if isinstance(meta.get("iter"), int):
        out["step"] = str(meta["iter"])
    if isinstance(meta.get("epoch"), int):
        out["epoch"] = str(meta["epoch"])
    return out


def _tensors(d: dict, path: Path) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not out:
        raise UserError(f"{path}: no tensors inside")
    return out
