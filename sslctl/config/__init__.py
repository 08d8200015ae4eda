"""Frozen configuration dataclasses loaded from profile YAML files.

A profile is a YAML mapping of sections (``model``, ``method``, ``loss``, ``optim``, ``train``,
``data``, ``ckpt``, ``init``, ``eval``, ``log``, ``paper``) to flat ``key: value`` mappings, one level deep. Unknown
keys, wrong types and values outside ``RANGES`` are errors that name the key and the file.
``--set section.key=value`` overrides a value (parsed as YAML). Derived values are computed in code.

A top-level ``extends: NAME_OR_PATH`` starts a profile from another one (a bundled name, or a
YAML path relative to the extending file), then overrides it section by section, key by key.
Chains are allowed up to ``MAX_EXTENDS`` steps; a cycle is an error. Without ``extends:``, a
pre-training profile must name ``method.name`` and ``model.arch`` itself (``REQUIRED``): a
file that names neither would otherwise train the defaults without saying so. Linear-eval
profiles need no key: their defaults are the standard protocol (SPEC §3) itself.

Profiles are read with a loader that refuses what a flat mapping never needs and a hostile
file could abuse: YAML aliases (a few hundred bytes of nested aliases expand to gigabytes),
nesting deeper than ``MAX_YAML_DEPTH``, duplicate keys (silently replaced otherwise), and
files over ``MAX_PROFILE_BYTES``.

A top-level ``kind`` says what a profile configures: ``pretrain`` (the default, loaded by
``load`` into ``Config``) or ``linear-eval`` (sections ``linear``, ``data``, ``cached``, ``knn``,
loaded by ``load_linear`` into ``LinearConfig``). Each loader refuses the other kind; a profile
inherits the kind of the one it extends and may not state another.

The package: ``schema`` (the dataclasses), ``keys`` (choices, ranges, limits), ``build``
(mapping -> checked config, rules across keys) and ``profiles`` (files, ``extends:``, ``load*``).
"""

from sslctl.config.build import (
    from_dict,
    linear_from_dict,
    validate,
    validate_linear,
)
from sslctl.config.keys import (
    CHOICES,
    EPOCHS,
    FACTOR,
    FRACTION,
    KINDS,
    MAX_EXTENDS,
    MAX_PROFILE_BYTES,
    MAX_YAML_DEPTH,
    MOMENTUM,
    NON_NEGATIVE,
    PIXELS,
    POSITIVE,
    QUOTE_LIMIT,
    RANGES,
    REQUIRED,
    SEED,
    WIDTH,
    Range,
)
from sslctl.config.profiles import (
    PROFILE_DIR,
    from_json,
    list_profiles,
    load,
    load_any,
    load_linear,
    parse_sets,
    profile_path,
    profile_table,
    to_yaml,
)
from sslctl.config.schema import (
    CachedCfg,
    CkptCfg,
    Config,
    DataCfg,
    EvalCfg,
    InitCfg,
    KnnCfg,
    LinearCfg,
    LinearConfig,
    LinearDataCfg,
    LogCfg,
    LossCfg,
    MethodCfg,
    ModelCfg,
    OptimCfg,
    PaperCfg,
    TrainCfg,
)

__all__ = [
    "CHOICES",
    "CachedCfg",
    "CkptCfg",
    "Config",
    "DataCfg",
    "EPOCHS",
    "EvalCfg",
    "FACTOR",
    "FRACTION",
    "InitCfg",
    "KINDS",
    "KnnCfg",
    "LinearCfg",
    "LinearConfig",
    "LinearDataCfg",
    "LogCfg",
    "LossCfg",
    "MAX_EXTENDS",
    "MAX_PROFILE_BYTES",
    "MAX_YAML_DEPTH",
    "MOMENTUM",
    "MethodCfg",
    "ModelCfg",
    "NON_NEGATIVE",
    "OptimCfg",
    "PIXELS",
    "POSITIVE",
    "PROFILE_DIR",
    "PaperCfg",
    "QUOTE_LIMIT",
    "RANGES",
    "REQUIRED",
    "Range",
    "SEED",
    "TrainCfg",
    "WIDTH",
    "from_dict",
    "from_json",
    "linear_from_dict",
    "list_profiles",
    "load",
    "load_any",
    "load_linear",
    "parse_sets",
    "profile_path",
    "profile_table",
    "to_yaml",
    "validate",
    "validate_linear",
]
