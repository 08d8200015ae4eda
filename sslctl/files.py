"""Files sslctl writes: atomically (temporary name it owns, fsync, rename), results JSON, caches.

Every temporary file starts with ``TMP_PREFIX``; ``remove_stale_temps`` deletes those a killed
process left (called with the run's lock held). ``cache_dir`` is where derived data (the demo
set, data indexes) lives: $SSLCTL_CACHE, else $XDG_CACHE_HOME/sslctl, else ~/.cache/sslctl.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sslctl import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's temp files are 0600


def fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows opening a directory
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TMP_PREFIX = ".sslctl-tmp."  # every temporary file sslctl writes starts with this


def temp_for(path: Path) -> Path:
    """A fresh, empty temporary file beside ``path`` under a name sslctl owns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_synced(write: Callable[[str], object], tmp: Path) -> None:
    try:
        write(str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except OSError as e:
        if not e.filename:
            e.filename = str(tmp)  # a failed write() names no file: name it (write_error)
        raise
    os.chmod(tmp, _FILE_MODE)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``; no partial file on failure."""
    tmp = temp_for(path)
    try:
        write_synced(write, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> int:
    """Delete temporaries left in ``directory`` by a killed process (call with the lock held,
    when no live process can own one). Returns how many were removed."""
    n = 0
    if directory.is_dir():
        # .*.tmp and .tmp*: what earlier sslctl builds (and safetensors' save_file inside
        # them) left behind
        old = [*directory.glob(".*.tmp"), *directory.glob(".tmp*")]
        for p in [*directory.glob(f"{TMP_PREFIX}*"), *old]:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                p.unlink()
                n += 1
    return n


def write_error(e: OSError) -> str:
    """An OS error while writing, as ``PATH: reason`` (the file it failed on and the OS's words;
    a temporary name is shown as the file it stands for)."""
    name = str(e.filename) if e.filename else ""
    if TMP_PREFIX in name:
        name = name.replace(TMP_PREFIX, "").rsplit(".", 1)[0]
    reason = e.strerror or str(e)
    return f"{name}: {reason}" if name else reason


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """``doc`` as indented JSON (an evaluation's results.json), written atomically."""
    write_text(path, json.dumps(doc, indent=2) + "\n")


def cache_dir() -> Path:
    """$SSLCTL_CACHE, else $XDG_CACHE_HOME/sslctl, else ~/.cache/sslctl."""
    if os.environ.get("SSLCTL_CACHE"):
        return Path(os.environ["SSLCTL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sslctl"


def unwritable_cache(what: str, folder: Path, e: OSError) -> UserError:
    """The one line for a cache folder sslctl cannot write (read-only, under a file, full)."""
    from sslctl.data.text import quote  # data sits above this module

    why = e.strerror or type(e).__name__
    return UserError(
        f"cannot write {what} under {quote(folder)} ({why}); set SSLCTL_CACHE to a writable folder"
    )
