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

import ast
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sslctl import UserError, checkpoint, log
from sslctl.data.text import quote

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
    # method, arch, step … where the source says; a reference .pth adds micro_iters (mmcv's
    # iter) and, when its saved config gives one, update_interval, from which step is derived
    meta: dict[str, str]


def _is_ours(path: Path) -> bool:
    return (
        path.is_dir()
        or (path.name == "last" and path.parent.is_dir())
        or (path.suffix == ".safetensors" and path.name.startswith("step_"))
    )


def read_backbone(
    path: Path, part: str = "online", trust_pickle: bool | None = None
) -> BackboneWeights:
    """The backbone in ``path``; ``trust_pickle`` allows full unpickling (runs code in the file).

    Every command that reads weights (extract, knn-eval, linear-eval, eval-reid,
    convert-detectron, init.weights) comes through here, so the two checks live here: a
    checkpoint file named explicitly must match its manifest, and no weight may be NaN or ±inf.
    ``trust_pickle`` False: the caller offers ``--trust-pickle`` (its refusal says so); None: it
    does not (the refusal points at ``sslctl extract --trust-pickle`` instead).
    """
    w = _read(path, part, trust_pickle)
    checkpoint.check_finite(w.state, w.meta.get("source", str(path)))
    return w


def _read(path: Path, part: str, trust_pickle: bool | None) -> BackboneWeights:
    if part not in PARTS:
        raise UserError(f"--part must be one of {', '.join(PARTS)}, got '{part}'")
    if not path.exists() and not (path.name == "last" and path.parent.is_dir()):
        raise UserError(f"{path}: no such file or directory")
    if _is_ours(path):
        ck = _resolve(path)
        if path.is_file():  # a directory or …/last resolved to a checkpoint that verified
            checkpoint.verify_explicit(ck.weights)
        state, meta = checkpoint.load_safetensors(ck.weights, prefix=f"{part}.backbone.")
        if not state:
            raise _no_part(ck.weights, part, meta)
        return BackboneWeights(state, "sslctl-checkpoint", {**meta, "source": str(ck.weights)})
    if path.suffix == ".safetensors":
        return _read_safetensors(path, part)
    if path.suffix == ".pkl":
        raise UserError(
            f"{path}: a .pkl (detectron2 format) is an output of convert-detectron, not an input; "
            "use the .safetensors or .pth it was made from"
        )
    return _read_pickle(path, part, trust_pickle)


def _no_part(path: Path, part: str, meta: dict[str, str]) -> UserError:
    if part == "target" and meta.get("method"):  # an sslctl checkpoint without target.*
        return UserError(
            f"{path}: a {meta['method']} checkpoint has no target network (the method trains "
            "one encoder); use --part online"
        )
    return UserError(f"{path}: no '{part}.backbone.*' tensors inside")


def _resolve(path: Path) -> checkpoint.CkptPaths:
    """``checkpoint.resolve``, but a run or checkpoints directory whose checkpoints all fail to
    verify is refused with the newest one's reason, and a skipped newer one is warned about."""
    run = path.parent if path.name == "last" and not path.exists() else path
    if not run.is_dir():
        return checkpoint.resolve(path)
    skipped: list[tuple[checkpoint.CkptPaths, str]] = []
    found = checkpoint.newest_valid(
        checkpoint.ckpt_dir_of(run), lambda c, why: skipped.append((c, why))
    )
    if found is None and skipped:
        c, why = skipped[0]
        older = f" (and the {len(skipped) - 1} older ones)" if len(skipped) > 1 else ""
        raise UserError(
            f"{run}: no valid checkpoint: step {c.step}: {why}{older}; restore it from a copy "
            "or use another run (`sslctl checkpoints` on this run lists each one's state)"
        )
    if found is None:
        return checkpoint.resolve(path)  # nothing there at all: its own line says so
    if skipped:
        c, why = skipped[0]
        said = f"{run}: the newest checkpoint, step {c.step}, does not verify ({why})"
        log.warn(f"{said}; using step {found.step}")
    return found


def _read_safetensors(path: Path, part: str) -> BackboneWeights:
    state, meta = checkpoint.load_safetensors(path)
    prefix = f"{part}.backbone."
    if any(k.startswith(prefix) for k in state):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        return BackboneWeights(sub, "sslctl-checkpoint", {**meta, "source": str(path)})
    if part == "target" and any(k.startswith("online.backbone.") for k in state):
        raise _no_part(path, part, meta)
    if part != "online" or any(k.startswith(("online.", "target.")) for k in state):
        raise UserError(f"{path}: no '{prefix}*' tensors inside")
    if not state:
        raise UserError(f"{path}: no tensors inside")
    kind = meta.get("format", "sslctl-backbone")
    return BackboneWeights(_strip_fc(state), kind, {**meta, "source": str(path)})


def _strip_fc(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _load_pickle(path: Path, trust_pickle: bool | None = None) -> Any:
    """``torch.load(weights_only=True)``, with its failures turned into one clear line.

    ``trust_pickle`` is the only way to read anything else: it warns, then unpickles fully.
    None: the calling command has no ``--trust-pickle``; the refusal names one that has.
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
                    f"--trust-pickle: unpickling {path} without restrictions; any code "
                    "stored in it runs now with your permissions"
                )
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds more than tensors"
        trust = (
            "pass --trust-pickle"  # the calling command offers it
            if trust_pickle is not None
            else "convert it once with `sslctl extract … --trust-pickle`"
        )
        raise UserError(
            f"{quote(str(path), 80)}: refused: {what}, and weights are read with a safe load (no "
            f"code runs); re-save it with torch.save(model.state_dict()), or {trust} if you "
            "trust its author"
        ) from None
    except Exception as e:  # a corrupt file surfaces as almost any error type (KeyError, EOFError…)
        why = _first_line(str(e)) or e.__class__.__name__
        raise UserError(f"{path}: not a readable PyTorch weights file ({why})") from None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:160] if lines else ""


def _read_pickle(path: Path, part: str, trust_pickle: bool | None = None) -> BackboneWeights:
    """A .pth read with weights_only=True: plain torchvision or reference mmcv layout."""
    obj = _load_pickle(path, trust_pickle)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict, found {type(obj).__name__}")
    state, kind = _pickled_backbone(obj, path, part)
    meta = {"source": str(path), **_mmcv_meta(obj.get("meta"))}
    if "micro_iters" in meta:
        log.info(_iters_report(path, meta))
    return BackboneWeights(state, kind, meta)


def _pickled_backbone(obj: dict, path: Path, part: str) -> tuple[dict[str, torch.Tensor], str]:
    sd = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), dict)), obj)
    for prefix in _PICKLE_PREFIXES[part]:
        sub = {
            k[len(prefix) :]: v
            for k, v in sd.items()
            if isinstance(k, str) and k.startswith(prefix)
        }
        if sub:
            return _tensors(_strip_fc(sub), path), "reference-mmcv"
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
    return _strip_fc(state), "torchvision"


def _iters_report(path: Path, meta: dict[str, str]) -> str:
    said = f"{path}: mmcv meta iter {meta['micro_iters']} counts micro-iterations"
    if "step" not in meta:
        return f"{said}, not optimizer steps; no saved config gives update_interval: step unknown"
    n = meta["update_interval"]
    return f"{said}; its config's update_interval {n} makes that {meta['step']} optimizer steps"


def _mmcv_meta(meta: object) -> dict[str, str]:
    """mmcv's checkpoint ``meta``: ``iter`` counts micro-iterations (one per batch, accumulated
    or not), ``epoch`` epochs. Optimizer steps are ``iter // update_interval`` where the config
    text saved beside them gives the interval; otherwise the step stays unknown.
    """
    if not isinstance(meta, dict):
        return {}
    out = {}
    iters = meta.get("iter")
    if isinstance(iters, int) and not isinstance(iters, bool):
        out["micro_iters"] = str(iters)
        config = meta.get("config")
        interval = _update_interval(config) if isinstance(config, str) else None
        if interval is not None:
            out["update_interval"] = str(interval)
            # DistOptimizerHook steps after micro-iterations n, 2n, …: whole steps only.
            out["step"] = str(iters // interval)
    if isinstance(meta.get("epoch"), int):
        out["epoch"] = str(meta["epoch"])
    return out


# mmcv's Config.text puts each config file's path on a line of its own before that file's text.
_PATH_LINE = re.compile(r"\s*\S+\.py\s*")
_UNSET = object()


def _update_interval(config_text: str) -> int | None:
    """The reference's gradient-accumulation interval, read (never run) from its config text.

    OpenSelfSup builds ``DistOptimizerHook(**optimizer_config)``, which steps the optimizer every
    ``update_interval`` micro-iterations, 1 when not given. None: no readable optimizer_config.
    As mmcv merges inherited configs, the last ``optimizer_config`` naming the key decides.
    """
    code = "\n".join(ln for ln in config_text.splitlines() if not _PATH_LINE.fullmatch(ln))
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError):
        return None
    names: dict[str, object] = {}  # top-level constants, for `update_interval=update_interval`
    seen, value = False, _UNSET
    for node in body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if not isinstance(target, ast.Name):
            continue
        if target.id == "optimizer_config":
            seen = True
            entry = _dict_entry(node.value, "update_interval")
            if entry is not None:
                value = _constant(entry, names)
        else:
            names[target.id] = _constant(node.value, names)
    if not seen:
        return None
    value = 1 if value is _UNSET else value
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _dict_entry(node: ast.expr, key: str) -> ast.expr | None:
    """The value given for ``key`` in a ``dict(key=…)`` call or a ``{"key": …}`` literal."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return next((kw.value for kw in node.keywords if kw.arg == key), None)
    if isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values, strict=True):
            if isinstance(k, ast.Constant) and k.value == key:
                return v
    return None


def _constant(node: ast.expr, names: dict[str, object]) -> object:
    if isinstance(node, ast.Name):
        return names.get(node.id)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _tensors(d: dict, path: Path) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not out:
        raise UserError(f"{path}: no tensors inside")
    return out
