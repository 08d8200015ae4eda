"""sslctl: self-supervised visual pre-training (Triplet, BYOL) and its standard evaluations."""

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# The signals that stop a run cleanly (checkpoint first): what Slurm, `timeout` and Ctrl-C send.
# Here, below every layer, so that the engine, the data loaders' workers and the launcher agree.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class UserError(Exception):
    """A mistake the user can fix: printed as one line by the CLI, exit code 2, no traceback."""


def last_line(e: BaseException, limit: int = 200) -> str:
    """The last non-empty line of an exception's message (for torch's load_state_dict errors,
    the one that names the mismatch), for quoting inside a one-line UserError."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else e.__class__.__name__


def as_path(value: str | os.PathLike[str] | None) -> Path | None:
    """A ``str`` or ``os.PathLike`` given to the Python API, as the Path the code uses."""
    return None if value is None else Path(value)


def paths_as_path(options: Any) -> None:
    """In a frozen options dataclass, turn a str/PathLike given for a Path field into a Path, and
    a PathLike given for a str field (``data``, which also takes "bundled") into a str. Called
    from ``__post_init__``, so that ``KnnEvalOptions(weights="runs/demo")`` works."""
    for f in dataclasses.fields(options):
        value, kind = getattr(options, f.name), str(f.type)
        if not isinstance(value, (str, os.PathLike)):
            continue
        if "Path" not in kind:  # a str field (data, profile): any PathLike as its str
            if "str" in kind and not isinstance(value, str):
                object.__setattr__(options, f.name, os.fspath(value))
        elif not isinstance(value, Path) and not (isinstance(value, str) and "str" in kind):
            object.__setattr__(options, f.name, Path(value))
