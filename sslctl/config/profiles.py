"""Reading profile files: the guarded YAML loader, ``extends:`` chains, bundled profile lookup,
``--set`` overrides, and the ``load*`` entry points."""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path
from typing import Any

import yaml

from sslctl import UserError
from sslctl.config.build import _clip, _profile_kind, _shown, from_dict, linear_from_dict
from sslctl.config.keys import MAX_EXTENDS, MAX_PROFILE_BYTES, MAX_YAML_DEPTH, REQUIRED
from sslctl.config.schema import Config, LinearConfig

PROFILE_DIR = Path(__file__).parent.parent / "profiles"


class _RefusedYAML(yaml.YAMLError):
    """What ``_ProfileLoader`` refuses; the message starts with the line (``line N: …``)."""


class _ProfileLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases, deep nesting and duplicate keys: a profile is a flat
    ``section: {key: value}`` map and needs none of them, while a hostile or mistaken file can
    use aliases to expand a few hundred bytes to gigabytes ("billion laughs"), nesting to
    exhaust the composer's recursion, and a repeated key to silently replace the first."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        line = self.peek_event().start_mark.line + 1
        if self.check_event(yaml.AliasEvent):
            raise _RefusedYAML(
                f"line {line}: YAML aliases (*name) are not allowed in profiles; write the "
                "value out, or start from another profile with `extends:`"
            )
        if self.depth >= MAX_YAML_DEPTH:
            raise _RefusedYAML(
                f"line {line}: nested more than {MAX_YAML_DEPTH} levels deep; a profile is "
                "`section: {key: value}`"
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # unhashable keys: SafeLoader's own error; `<<` merges: its own rules
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first:
                raise _RefusedYAML(
                    f"line {line}: duplicate key {_shown(key)} (first on line {first[key]}); "
                    "keep one"
                )
            first[key] = line
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str) -> Any:
    """``text`` parsed by ``_ProfileLoader`` (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=_ProfileLoader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        return f"line {e.problem_mark.line + 1}: {e.problem or e.context or 'syntax error'}"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_yaml(path: Path) -> Any:
    """One profile file's YAML, or a UserError naming ``path``."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
        if len(data) > MAX_PROFILE_BYTES:
            raise UserError(
                f"{path}: larger than {MAX_PROFILE_BYTES >> 20} MB; a profile is a small YAML "
                "file of settings (is this the right file?)"
            )
        return _parse_yaml(data.decode("utf-8"))
    except _RefusedYAML as e:
        raise UserError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({_clip(_yaml_problem(e), 120)})") from None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or an int over 4300 digits
        raise UserError(f"{path}: cannot read profile ({_clip(str(e), 120)})") from None


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``: sections merge key by key, other values are replaced."""
    out = dict(parent)
    for k, v in child.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = {**out[k], **v} if both else v
    return out


def _resolve(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], str]:
    """The profile at ``path`` as one mapping, its ``extends:`` chain merged in (parents first),
    and the name it extends ("" when none). ``chain``: the profiles that extend this one."""
    raw = _read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: a profile must be a YAML mapping of sections, got {type(raw).__name__}"
        )
    if "extends" not in raw:
        return raw, ""
    parent_name = raw.pop("extends")
    if not isinstance(parent_name, str) or not parent_name.strip():
        raise UserError(
            f"{path}: key 'extends' must name a bundled profile or a .yaml file, got "
            f"{_shown(parent_name)}"
        )
    chain = (*chain, path.resolve())
    try:
        parent_path = profile_path(parent_name, base=path.parent)
    except UserError as e:
        raise UserError(f"{path}: extends: {e}") from None
    if parent_path.resolve() in chain:
        cycle = " → ".join(p.name for p in (*chain, parent_path.resolve()))
        raise UserError(f"{path}: `extends:` makes a cycle ({_clip(cycle, 160)}); break it")
    if len(chain) > MAX_EXTENDS:
        raise UserError(
            f"{path}: more than {MAX_EXTENDS} `extends:` steps; extend a profile nearer the root"
        )
    parent, _ = _resolve(parent_path, chain)
    parent_kind = parent.get("kind", "pretrain")
    if "kind" in raw and raw["kind"] != parent_kind:
        raise UserError(
            f"{path}: kind {_shown(raw['kind'])} but it extends {_clip(parent_name)} (kind "
            f"{parent_kind}); a profile extends one of its own kind (or leave out 'kind')"
        )
    return _merge(parent, raw), parent_name


def _is(test: typing.Callable[[], bool]) -> bool:
    """``test()`` (Path.exists / is_file), False where the name cannot be a file at all (too
    long, a NUL byte): those raise instead of answering False."""
    try:
        return test()
    except (OSError, ValueError):
        return False


def profile_path(name_or_path: str, base: Path | None = None) -> Path:
    """The file of a profile: a path (relative to ``base``, default the working directory)
    when it ends in .yaml/.yml or exists, else the bundled profile of that name."""
    p = (base or Path()) / Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or _is(p.exists):
        if not _is(p.is_file):
            raise UserError(f"profile file not found: {_clip(str(p), 160)}")
        return p
    bundled = PROFILE_DIR / f"{name_or_path}.yaml"
    if not _is(bundled.is_file):
        close = difflib.get_close_matches(name_or_path, sorted(list_profiles(None)), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"unknown profile {_shown(name_or_path)} ({hint}`sslctl profiles` lists the bundled "
            "ones; or pass a .yaml path)"
        )
    return bundled


def profile_table() -> dict[str, tuple[str, str]]:
    """Bundled profile name -> (kind, one-line description)."""
    out = {}
    for p in sorted(PROFILE_DIR.glob("*.yaml")):
        raw, _ = _resolve(p)
        out[p.stem] = (str(raw.get("kind", "pretrain")), str(raw.get("description", "")))
    return out


def list_profiles(kind: str | None = "pretrain") -> dict[str, str]:
    """Bundled profiles of one kind (None: every kind) -> their one-line descriptions."""
    return {n: desc for n, (k, desc) in profile_table().items() if kind is None or k == kind}


def parse_sets(sets: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings -> nested overrides (values parsed as YAML scalars)."""
    out: dict[str, dict[str, Any]] = {}
    for s in sets:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise UserError(
                f"--set {_shown(s)}: expected section.key=value, e.g. --set optim.lr=2.4"
            )
        key, val = s.split("=", 1)
        sec, name = key.strip().split(".", 1)
        try:
            parsed = _parse_yaml(val) if val.strip() else ""
        except (yaml.YAMLError, ValueError):  # not YAML, or refused: the type check judges the text
            parsed = val
        out.setdefault(sec, {})[name] = parsed
    return out


def _read_raw(profile: str, sets: list[str]) -> tuple[dict[str, Any], str, dict[str, str]]:
    """The profile's mapping (its ``extends:`` chain and --set overrides merged in), the source
    named in errors, and each --set key's text as typed (``optim.lr`` -> ``.inf``)."""
    path = profile_path(profile)
    raw, parent = _resolve(path)
    for sec, kv in parse_sets(sets).items():
        if sec in ("description", "kind", "extends") or not isinstance(raw.get(sec, {}), dict):
            raise UserError(f"--set {_clip(sec)}.*: '{_clip(sec)}' is not a settable section")
        raw[sec] = {**(raw.get(sec) or {}), **kv}
    texts = {k.strip(): v.strip() for k, v in (s.split("=", 1) for s in sets)}
    notes = [f"extends {_clip(parent, 60)}"] * bool(parent) + ["with --set"] * bool(sets)
    return raw, f"{path}" + (f" ({', '.join(notes)})" if notes else ""), texts


def load(profile: str, sets: list[str] | None = None) -> Config:
    """Load a bundled pre-training profile (by name) or a YAML file, then apply --set overrides."""
    raw, src, texts = _read_raw(profile, sets or [])
    return from_dict(raw, src, texts, REQUIRED)


def load_linear(profile: str, sets: list[str] | None = None) -> LinearConfig:
    """Load a linear-eval profile (``kind: linear-eval``) by name or path, with --set overrides."""
    raw, src, texts = _read_raw(profile, sets or [])
    return linear_from_dict(raw, src, texts)


def load_any(profile: str, sets: list[str] | None = None) -> Config | LinearConfig:
    """Load a profile of either kind (its ``kind`` picks the loader), with --set overrides."""
    raw, src, texts = _read_raw(profile, sets or [])
    if _profile_kind(raw, src) == "linear-eval":
        return linear_from_dict(raw, src, texts)
    return from_dict(raw, src, texts, REQUIRED)


def from_json(text: str, source: str = "checkpoint") -> Config:
    return from_dict(json.loads(text), source)


def to_yaml(cfg: Config | LinearConfig) -> str:
    """The resolved config as a profile that loads back to it (pretrain's has no ``kind``)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
