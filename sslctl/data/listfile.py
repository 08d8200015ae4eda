"""List files: samples from ``relative/path label`` lines, checked where they are read.

An entry that resolves outside the data root (``../..``, an absolute path, a symlink out) is
refused unless ``allow_outside_root``; a label outside ``[-1, MAX_LABEL)`` is refused with its
line; a path longer than any file system opens is skipped with one warning, and so are entries
naming a FIFO, socket or device. Every path or line a message quotes goes through ``quote``.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sslctl import UserError
from sslctl.data.readers import (
    MAX_PATH_CHARS,
    Sample,
    Skipped,
    is_special_mode,
    require_dir,
    stat_or_none,
)
from sslctl.data.text import quote, warn

# List-file labels are class indices in [-1, MAX_LABEL): -1 is the usual "no label" mark (kept;
# the evaluations refuse negative labels themselves); anything larger than ImageNet-21k's
# 21,843 classes by far is a corrupt line, and would make kNN/linear evaluation allocate
# that many classes (10^12 of them: a MemoryError) before saying anything.
MAX_LABEL = 1_000_000
MIN_LABEL = -1

_STAT_CHUNK = 4096  # list-file paths per stat task: few tasks for a million entries

_OK, _SPECIAL, _OUTSIDE = 0, 1, 2  # what _RootCheck.classify says of a list-file entry


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _RootCheck:
    """Whether list-file entries are FIFOs/devices, and whether they lead out of the data root:
    by their name (``../..``, an absolute path) or through a symlink (the file itself or a
    folder on its way). Folders are resolved once each (a million entries share a thousand),
    so an entry costs one lstat, like the stat it replaces."""

    def __init__(self, base: Path, check_outside: bool):
        self.check_outside = check_outside
        self.lexical = os.path.abspath(base)
        self.real = os.path.realpath(base)
        self.dirs: dict[str, str] = {}  # folder → its real path; filled from several threads

    def target(self, path: str, st: os.stat_result | None) -> str:
        """Where ``path`` really leads (``st``: its lstat, None if it cannot be stat'ed)."""
        if st is not None and stat.S_ISLNK(st.st_mode):
            return os.path.realpath(path)
        folder, name = os.path.split(os.path.abspath(path))
        real = self.dirs.get(folder)
        if real is None:
            try:
                real = os.path.realpath(folder)
            except ValueError:  # a NUL byte: the entry names nothing, the decoder says so
                real = folder
            self.dirs[folder] = real
        return os.path.join(real, name)

    def classify(self, path: str) -> int:
        try:
            st: os.stat_result | None = os.lstat(path)
        except (OSError, ValueError):  # missing, or a name lstat refuses (a NUL byte)
            st = None
        if self.check_outside and not (
            _under(os.path.abspath(path), self.lexical) and _under(self.target(path, st), self.real)
        ):
            return _OUTSIDE
        if st is not None and stat.S_ISLNK(st.st_mode):
            st = stat_or_none(path)  # a dangling link passes: the decoder reports it
        return _SPECIAL if st is not None and is_special_mode(st.st_mode) else _OK

    def classify_all(self, paths: list[str]) -> list[int]:
        """classify() of each path, in threads: on a network file system each stat is a round
        trip, and a list file may name a million images."""

        def part(lo: int) -> list[int]:
            return [self.classify(p) for p in paths[lo : lo + _STAT_CHUNK]]

        with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
            parts = pool.map(part, range(0, len(paths), _STAT_CHUNK))
            return [code for chunk in parts for code in chunk]


_Entry = tuple[int, str, int]  # (line number, path as written, label)


def read_list_file(
    list_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    skipped: Skipped | None = None,
    *,
    allow_outside_root: bool = False,
) -> list[Sample]:
    """Samples from a list file of ``relative/path.JPEG label`` lines, paths relative to ``root``.

    The label is optional (default 0) and must lie in [-1, MAX_LABEL) (-1: no label). Blank
    lines and lines starting with ``#`` are skipped. A path may contain spaces when a label
    follows it (the label is the last field).
    Refused with the count and the first offending line: entries that lead outside ``root``
    (``../``, absolute paths, symlinks out), unless ``allow_outside_root`` (then absolute paths
    are taken as they are). Left out with one warning each kind (and counted in ``skipped``
    when given): entries naming a FIFO, socket or device, and paths too long to name a file.
    """
    lp = _list_path(list_path)
    base = require_dir(root, "data root")
    entries = _drop_long(_parse_list(lp, _read_list_text(lp)), lp, skipped)
    if not entries:
        raise UserError(f"list file {quote(lp)} has no entries")
    paths = [str(base / rel) for _, rel, _ in entries]
    check = _RootCheck(base, check_outside=not allow_outside_root)
    codes = check.classify_all(paths)
    outside = [i for i, c in enumerate(codes) if c == _OUTSIDE]
    if outside:
        raise _outside_error(lp, entries[outside[0]], paths[outside[0]], len(outside), check)
    samples = [(p, e[2]) for p, e in zip(paths, entries, strict=True)]
    samples, lines = _drop_special(samples, [e[0] for e in entries], codes, lp, skipped)
    if not os.path.exists(samples[0][0]):
        raise UserError(
            f"{quote(lp, 80)}, line {lines[0]}: {quote(samples[0][0], 120)} not found; paths in "
            f"a list file are relative to the data root {quote(base, 80)}"
        )
    return samples


def _list_path(list_path: str | os.PathLike[str]) -> Path:
    lp = Path(list_path).expanduser()
    st = stat_or_none(lp)
    if st is None:
        raise UserError(f"list file {quote(lp)} not found")
    if not stat.S_ISREG(st.st_mode):  # a folder; a FIFO would block the read for ever
        raise UserError(
            f"list file {quote(lp)} is not a regular file; pass a text file of "
            "'relative/path label' lines"
        )
    return lp


def _read_list_text(lp: Path) -> str:
    try:
        return lp.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{quote(lp)}: not a UTF-8 text list file (byte {e.start}); expected 'relative/path "
            "label' lines"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read list file {quote(lp)} ({e.strerror or e})") from None


def _parse_list(lp: Path, text: str) -> list[_Entry]:
    entries: list[_Entry] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = _label(parts[1], lp, lineno, line) if len(parts) == 2 else 0
        entries.append((lineno, parts[0], label))
    return entries


def _label(field: str, lp: Path, lineno: int, line: str) -> int:
    try:
        label = int(field)
    except ValueError:
        raise UserError(
            f"{quote(lp, 100)}, line {lineno}: expected 'relative/path' or 'relative/path LABEL' (LABEL an integer), got "
            f"'{quote(line, 100)}'"
        ) from None
    if not MIN_LABEL <= label < MAX_LABEL:
        raise UserError(
            f"{quote(lp, 100)}, line {lineno}: label {quote(field, 40)} is not a class index "
            f"({MIN_LABEL}..{MAX_LABEL - 1:,}; -1 = no label): fix the line or the list"
        )
    return label


def _drop_long(entries: list[_Entry], lp: Path, skipped: Skipped | None) -> list[_Entry]:
    """Entries whose path no file system opens (a corrupt line, perhaps megabytes long), left
    out with one warning quoting the first one, shortened."""
    long = [e for e in entries if len(e[1]) > MAX_PATH_CHARS]
    if not long:
        return entries
    found = Skipped(long_paths=len(long))
    warn(
        f"list file {quote(lp, 100)}: skipped {found.describe()} (first: line {long[0][0]}, "
        f"{quote(long[0][1], 60)})"
    )
    if skipped is not None:
        skipped.add(found)
    return [e for e in entries if len(e[1]) <= MAX_PATH_CHARS]


def _outside_error(lp: Path, entry: _Entry, path: str, n: int, check: _RootCheck) -> UserError:
    lineno, rel, _ = entry
    by_name = not _under(os.path.abspath(path), check.lexical)
    via = "" if by_name else " through a symlink"
    many = f"{n:,} such entries" if n > 1 else "1 such entry"
    return UserError(
        f"list file {quote(lp, 80)}, line {lineno}: {quote(rel, 80)} is outside the data "
        f"root{via} ({many}); use paths under the root, or set data.allow_outside_root=true "
        "(data check: --allow-outside-root)"
    )


def _drop_special(
    samples: list[Sample], lines: list[int], codes: list[int], lp: Path, skipped: Skipped | None
) -> tuple[list[Sample], list[int]]:
    """Samples (and their line numbers) without the FIFOs, sockets and devices."""
    found = Skipped(special=codes.count(_SPECIAL))
    found.warn(f"list file {lp}")
    if skipped is not None:
        skipped.add(found)
    if len(samples) == found.special:
        raise UserError(
            f"list file {quote(lp)}: every entry names a FIFO, socket or device, not an image "
            "file (list regular image files)"
        )
    keep = [i for i, c in enumerate(codes) if c != _SPECIAL]
    return [samples[i] for i in keep], [lines[i] for i in keep]
