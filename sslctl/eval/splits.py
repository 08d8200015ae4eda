"""Labelled train/val splits for linear evaluation and kNN: resolved, checked, fingerprinted.

``--data ROOT`` means ``ROOT/train`` and ``ROOT/val`` (ImageFolder layout), ``--data bundled``
the bundled demo set; ``--train``/``--val`` name either split explicitly as a folder or a list
file of ``relative/path label`` lines (paths relative to ``--data`` when given, else to the list
file's folder). Both splits must agree on their classes, or the head's indices would be wrong.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sslctl import UserError
from sslctl.data.listfile import read_list_file
from sslctl.data.readers import Sample, scan_imagefolder


@dataclass(frozen=True)
class Splits:
    train: list[Sample]
    val: list[Sample]
    num_classes: int
    classes: list[str]  # class-folder names; "" entries when labels come from list files
    train_source: str
    val_source: str


def _read_split(
    path: Path, root: Path | None, what: str, allow_outside_root: bool
) -> tuple[list[Sample], list[str] | None]:
    """(samples, class names or None for a list file) of one split."""
    if path.is_dir():
        samples, classes = scan_imagefolder(path)
        if classes == [""]:
            raise UserError(
                f"{what} {path}: images without class folders; linear evaluation needs labels "
                f"({path}/<class>/<image>) or a list file of 'relative/path label' lines"
            )
        return samples, classes
    if path.is_file():
        base = root if root is not None else path.parent
        return read_list_file(path, base, allow_outside_root=allow_outside_root), None
    raise UserError(f"{what} {path}: no such folder or list file")


def _named_split(data: Path | None, given: Path | None, name: str) -> Path:
    if given is not None:
        return given
    if data is None:
        raise UserError(f"give --data ROOT (with {name}/ inside) or --{name} FOLDER_OR_LIST")
    path = data / name
    if not path.is_dir():
        raise UserError(
            f"--data {data}: no {name}/ folder inside (expected {data}/train and {data}/val "
            f"in the ImageFolder layout, or give --{name} FOLDER_OR_LIST)"
        )
    return path


def resolve_data(data: str | Path | None) -> Path | None:
    """``bundled`` → the bundled demo root (built on first use); otherwise the path itself."""
    if data is None:
        return None
    from sslctl.data import bundled

    path = bundled.resolve(data).expanduser()
    if not path.is_dir():
        raise UserError(f"--data {path}: no such directory")
    return path


def resolve_splits(
    data: str | Path | None,
    train: Path | None = None,
    val: Path | None = None,
    allow_outside_root: bool = False,
) -> Splits:
    """The labelled splits the user named, with their classes checked against each other;
    ``allow_outside_root``: list-file entries may point outside the data root."""
    root = resolve_data(data)
    tpath, vpath = _named_split(root, train, "train"), _named_split(root, val, "val")
    tr, tr_classes = _read_split(
        tpath, root, "--train" if train else "train split", allow_outside_root
    )
    va, va_classes = _read_split(vpath, root, "--val" if val else "val split", allow_outside_root)
    n = check_classes(tr, va, tr_classes, va_classes, str(tpath), str(vpath))
    return Splits(tr, va, n, tr_classes or [""] * n, str(tpath), str(vpath))


def check_classes(
    train: list[Sample],
    val: list[Sample],
    train_classes: list[str] | None,
    val_classes: list[str] | None,
    train_src: str,
    val_src: str,
) -> int:
    """The number of classes; UserError when train and val disagree on them."""
    if train_classes is not None and val_classes is not None:
        if train_classes != val_classes:
            only_t = sorted(set(train_classes) - set(val_classes))[:3]
            only_v = sorted(set(val_classes) - set(train_classes))[:3]
            raise UserError(
                f"class mismatch between train ({train_src}, {len(train_classes)} classes) and "
                f"val ({val_src}, {len(val_classes)} classes): only in train {only_t}, only in "
                f"val {only_v}; both splits need the same class folders"
            )
        return len(train_classes)
    if (train_classes is None) != (val_classes is None):
        raise UserError(
            f"train ({train_src}) and val ({val_src}) must both be folders or both list files: "
            "class indices from folder names and from list-file labels need not agree"
        )
    n = max(label for _, label in train) + 1
    extra = sorted({label for _, label in val if not 0 <= label < n})
    if extra or min(label for _, label in train) < 0:
        raise UserError(
            f"class mismatch between train ({train_src}, labels 0..{n - 1}) and val "
            f"({val_src}): val labels {extra[:5]} are not train classes (or a label is negative)"
        )
    return n


def listing_digest(samples: list[Sample]) -> str:
    """sha256 of the (path, label) listing. File contents are not read (ImageNet has 1.3 M
    files): a file replaced in place under the same name needs ``--recompute``."""
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()
