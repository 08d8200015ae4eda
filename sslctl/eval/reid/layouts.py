"""Re-identification test-set layouts (REID.md §5) and the 256×128 image dataset.

A layout turns a directory tree into two ``ReidSplit``s (query, gallery): image paths in a
deterministic order (sorted relative POSIX paths = ImageFolder order) with an identity and a
camera per image. Identity −1 is junk, 0 a distractor (a negative in every ranked list).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from sslctl import UserError
from sslctl.data.readers import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, DecodeError, pixel_problem

LAYOUTS = ("sysu30k", "market1501", "imagefolder")
IMAGE_SIZE = (256, 128)  # H×W, as every re-ID reference script
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORM_TAG = "resize=256x128,bicubic,pil,no-crop,imagenet-norm"

_SYSU_RE = re.compile(r"^(?P<id>\d+|0000others)_c(?P<cam>\d+)(?:_[^/]*)?\.[A-Za-z]+$")
_MARKET_RE = re.compile(r"^(?P<pid>-1|\d+)_c(?P<cam>\d+)")
_SYSU_EXAMPLE = (
    "expected <id>_c<cam>_<n>.jpg (e.g. 000028311_c1_1.jpg) or 0000others_c<cam>_<n>.jpg "
    "for --layout sysu30k"
)
_MARKET_EXAMPLE = (
    "expected <pid>_c<cam>… (e.g. 0002_c1s1_000451_03.jpg, -1_c3s1_000001_00.jpg) "
    "for --layout market1501"
)


@dataclass(frozen=True)
class ReidSplit:
    """One side (query or gallery): paths in dataset order with identity and camera labels."""

    root: Path
    rel: tuple[str, ...]  # POSIX paths relative to root, the order key
    ids: torch.Tensor  # int64; −1 junk, 0 distractor
    cams: torch.Tensor  # int64; −1 unknown

    @property
    def paths(self) -> list[Path]:
        return [self.root / r for r in self.rel]

    def __len__(self) -> int:
        return len(self.rel)


def list_images(root: Path) -> list[str]:
    """Images below root as sorted relative POSIX paths; hidden entries skipped, links followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def _images_or_fail(root: Path, what: str) -> list[str]:
    if not root.is_dir():
        raise UserError(f"{what} folder {root} does not exist or is not a directory")
    rel = list_images(root)
    if not rel:
        exts = " ".join(IMAGE_EXTENSIONS)
        raise UserError(f"{what} folder {root} contains no images (extensions {exts})")
    return rel


def _split(root: Path, rel: list[str], ids: list[int], cams: list[int]) -> ReidSplit:
    return ReidSplit(
        root=root,
        rel=tuple(rel),
        ids=torch.tensor(ids, dtype=torch.int64),
        cams=torch.tensor(cams, dtype=torch.int64),
    )


def _parse_sysu(root: Path, rel: list[str]) -> tuple[list[int], list[int]]:
    ids, cams = [], []
    for r in rel:
        parts = r.split("/")
        m = _SYSU_RE.match(parts[-1])
        if m is None:
            raise UserError(f"cannot parse '{root.name}/{r}': {_SYSU_EXAMPLE}")
        token = m["id"]
        # A mis-copied tree (image in the wrong identity folder) would silently corrupt labels.
        if len(parts) > 1 and parts[-2] != token:
            raise UserError(
                f"'{root.name}/{r}': folder '{parts[-2]}' does not match the identity '{token}' "
                "in the file name (--layout sysu30k expects <id>/<id>_c<cam>_<n>.jpg)"
            )
        ids.append(0 if token == "0000others" else int(token))
        cams.append(int(m["cam"]))
    return ids, cams


def _parse_market(root: Path, rel: list[str]) -> tuple[list[int], list[int]]:
    ids, cams = [], []
    for r in rel:
        m = _MARKET_RE.match(r.rsplit("/", 1)[-1])
        if m is None:
            raise UserError(f"cannot parse '{root.name}/{r}': {_MARKET_EXAMPLE}")
        ids.append(int(m["pid"]))
        cams.append(int(m["cam"]))  # multi-digit cameras (MSMT17 c10–c15) parse whole
    return ids, cams


def _folder_classes(root: Path, rel: list[str]) -> list[str]:
    classes = []
    for r in rel:
        parts = r.split("/")
        if len(parts) < 2:
            raise UserError(
                f"'{root.name}/{r}' is not inside an identity folder: --layout imagefolder "
                f"expects {root.name}/<identity>/<image>"
            )
        classes.append(parts[0])
    return classes


def camera_pattern(camera_regex: str) -> re.Pattern[str]:
    """--camera-regex compiled; a UserError unless it is a regex with one capture group."""
    try:
        pattern = re.compile(camera_regex)
    except re.error as e:
        raise UserError(f"--camera-regex {camera_regex!r} is not a valid regex ({e})") from None
    if pattern.groups != 1:
        raise UserError(f"--camera-regex {camera_regex!r} must have exactly one capture group")
    return pattern


def _cameras_by_regex(root: Path, rel: list[str], camera_regex: str | None) -> list[int]:
    if camera_regex is None:
        return [-1] * len(rel)
    pattern = camera_pattern(camera_regex)
    cams = []
    for r in rel:
        m = pattern.search(r.rsplit("/", 1)[-1])
        if m is None or not (m.group(1) or "").isdigit():
            raise UserError(
                f"--camera-regex {camera_regex!r} finds no camera number in '{root.name}/{r}'"
            )
        cams.append(int(m.group(1)))
    return cams


def _scan_imagefolder(
    qroot: Path, groot: Path, junk_classes: Sequence[str], camera_regex: str | None
) -> tuple[ReidSplit, ReidSplit]:
    """Identity = class folder name through one vocabulary shared by query and gallery."""
    qrel, grel = _images_or_fail(qroot, "query"), _images_or_fail(groot, "gallery")
    qcls, gcls = _folder_classes(qroot, qrel), _folder_classes(groot, grel)
    junk = set(junk_classes)
    # ids start at 1: 0 and −1 keep their distractor / junk meaning.
    vocab = {c: i + 1 for i, c in enumerate(sorted((set(qcls) | set(gcls)) - junk))}
    qids = [-1 if c in junk else vocab[c] for c in qcls]
    gids = [-1 if c in junk else vocab[c] for c in gcls]
    qcams = _cameras_by_regex(qroot, qrel, camera_regex)
    gcams = _cameras_by_regex(groot, grel, camera_regex)
    return _split(qroot, qrel, qids, qcams), _split(groot, grel, gids, gcams)


SYSU_DISTRACTORS = "0000others"  # SYSU-30k's distractor folder and file-name prefix
MARKET_SUBDIR = "Market-1501-v15.09.15"  # the official archive's top folder
_LAYOUT_HINT = "pass --layout sysu30k, market1501 or imagefolder"


def _has_sysu_distractors(gallery: Path) -> bool:
    """gallery/0000others/ (ImageFolder) or a flat gallery/0000others_c… file; one readdir."""
    try:
        with os.scandir(gallery) as entries:
            return any(
                e.name == SYSU_DISTRACTORS or e.name.startswith(SYSU_DISTRACTORS + "_")
                for e in entries
            )
    except OSError:  # missing or unreadable: not this layout (the scan reports it)
        return False


def _found(data: Path, limit: int = 5) -> str:
    """What a folder holds, for a message: 'images/, query/, notes.txt, … (9 entries)'."""
    try:
        names = sorted(d.name + ("/" if d.is_dir() else "") for d in os.scandir(data))
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    names = [n if len(n) <= 24 else n[:23] + "…" for n in names if not n.startswith(".")]
    if not names:
        return "nothing"
    more = f", … ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def detect_layout(data: Path | None, query: Path | None, gallery: Path | None) -> tuple[str, str]:
    """(layout, what gave it away) when the tree is unambiguous, else one-line UserError.

    market1501: query/ + bounding_box_test/ (also under Market-1501-v15.09.15/); sysu30k:
    query/ + gallery/ holding 0000others (folder or flat file names). query/ + gallery/ alone
    fits market1501 (layumi's tree) and imagefolder alike, so it is refused with the choices.
    """
    if query is not None or gallery is not None:
        if query is None or gallery is None or data is not None:
            raise UserError("give either --data DIR or both --query DIR and --gallery DIR")
        for flag, folder in (("--query", query), ("--gallery", gallery)):
            if not folder.is_dir():
                raise UserError(f"{flag} {folder} does not exist or is not a directory")
        if _has_sysu_distractors(gallery):
            return "sysu30k", f"--gallery with {SYSU_DISTRACTORS}"
        raise UserError(
            f"cannot tell the layout of --query {query} --gallery {gallery} "
            f"(no {SYSU_DISTRACTORS} in the gallery): {_LAYOUT_HINT}"
        )
    if data is None:
        raise UserError("no test set given: pass --data DIR (or --query DIR --gallery DIR)")
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist or is not a directory")
    found = []
    for base in (data, data / MARKET_SUBDIR):
        if (base / "query").is_dir() and (base / "bounding_box_test").is_dir():
            prefix = "" if base == data else f"{MARKET_SUBDIR}/"
            found.append(("market1501", f"{prefix}query/ + {prefix}bounding_box_test/"))
            break
    if (data / "query").is_dir() and _has_sysu_distractors(data / "gallery"):
        found.append(("sysu30k", f"query/ + gallery/ with {SYSU_DISTRACTORS}"))
    if len(found) == 1:
        return found[0]
    if found:
        why = "fits both market1501 and sysu30k"
    elif (data / "query").is_dir() and (data / "gallery").is_dir():
        why = f"query/ + gallery/ without {SYSU_DISTRACTORS} fits market1501 and imagefolder"
    else:
        why = "no query/ beside bounding_box_test/ or gallery/"
    raise UserError(
        f"cannot tell the layout of --data {data} ({why}; found: {_found(data)}): {_LAYOUT_HINT}"
    )


def resolve_roots(
    layout: str, data: Path | None, query: Path | None, gallery: Path | None
) -> tuple[Path, Path]:
    """(query dir, gallery dir) from --data DIR or from explicit --query/--gallery."""
    if query is not None or gallery is not None:
        if query is None or gallery is None or data is not None:
            raise UserError("give either --data DIR or both --query DIR and --gallery DIR")
        return query, gallery
    if data is None:
        raise UserError("no test set given: pass --data DIR (or --query DIR --gallery DIR)")
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist or is not a directory")
    if layout != "market1501":
        return data / "query", data / "gallery"
    for base in (data, data / MARKET_SUBDIR):
        for gname in ("bounding_box_test", "gallery"):
            if (base / "query").is_dir() and (base / gname).is_dir():
                return base / "query", base / gname
    raise UserError(
        f"--data {data}: expected query/ and bounding_box_test/ (or layumi's query/ and gallery/) "
        "for --layout market1501; or pass --query DIR --gallery DIR"
    )


def scan_layout(
    layout: str,
    qroot: Path,
    groot: Path,
    *,
    junk_classes: Sequence[str] = ("-1",),
    camera_regex: str | None = None,
) -> tuple[ReidSplit, ReidSplit]:
    """Query and gallery splits of a test set in one of LAYOUTS (REID.md §5.2–5.4)."""
    if layout == "imagefolder":
        return _scan_imagefolder(qroot, groot, junk_classes, camera_regex)
    parsers = {"sysu30k": _parse_sysu, "market1501": _parse_market}
    if layout not in parsers:
        raise UserError(f"unknown --layout '{layout}' (known: {', '.join(LAYOUTS)})")
    splits = []
    for root, what in ((qroot, "query"), (groot, "gallery")):
        rel = _images_or_fail(root, what)
        ids, cams = parsers[layout](root, rel)
        splits.append(_split(root, rel, ids, cams))
    return splits[0], splits[1]


def _short_list(values: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", … ({len(values)} in all)" if len(values) > limit else "")


def _same_camera_match(
    qid: np.ndarray, qcam: np.ndarray, gid: np.ndarray, gcam: np.ndarray
) -> np.ndarray:
    """Per query: does the gallery hold its identity seen by its camera (both cameras known)?"""
    width = int(max(qcam.max(initial=0), gcam.max(initial=0))) + 1
    gkeys = (gid + 1) * width + gcam  # ids ≥ −1 and cameras ≥ 0 give distinct keys
    qkeys = (qid + 1) * width + qcam
    return (qcam >= 0) & np.isin(qkeys, gkeys[gcam >= 0])


def describe(
    layout: str, qids: torch.Tensor, qcams: torch.Tensor, gids: torch.Tensor, gcams: torch.Tensor
) -> tuple[list[str], list[str]]:
    """Sanity report (info lines, warning lines) on a test set's labels; never fails."""
    qid, qcam, gid, gcam = qids.numpy(), qcams.numpy(), gids.numpy(), gcams.numpy()
    valid_q = (qid != -1) & (qid != 0)
    distractors = int(((gid >= 0) & ~np.isin(gid, qid[valid_q])).sum())
    lines = [
        f"query: {len(qid)} images, {len(np.unique(qid))} identities; gallery: {len(gid)} "
        f"images ({int((gid == -1).sum())} junk, {distractors} distractors)",
        f"cameras: query {{{_short_list(np.unique(qcam).tolist())}}}, "
        f"gallery {{{_short_list(np.unique(gcam).tolist())}}}",
    ]
    ids, counts = np.unique(gid, return_counts=True)
    same_id = np.zeros(len(qid), dtype=np.int64)
    pos = np.searchsorted(ids, qid)
    hit = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == qid)
    same_id[hit] = counts[pos[hit]]
    if valid_q.any():
        per_q = same_id[valid_q]
        lines.append(f"gallery images per query identity: min {per_q.min()}, max {per_q.max()}")
    warnings = []
    if layout == "sysu30k" and valid_q.any() and not (same_id[valid_q] == 1).all():
        warnings.append("sysu30k expects exactly one gallery image per query identity")
    if (~valid_q).any():
        warnings.append(f"{int((~valid_q).sum())} queries have identity −1 or 0 (invalid queries)")
    same_cam = _same_camera_match(qid, qcam, gid, gcam) & valid_q
    if same_cam.any():
        warnings.append(
            f"{int(same_cam.sum())} queries have a same-identity same-camera gallery image: it is "
            "junk and such a query may have no valid match"
        )
    if (qcam < 0).all() or (gcam < 0).all():
        warnings.append("camera-unaware protocol: same-camera matches count")
    return lines, warnings


def _hash_as_int64(data: bytes) -> torch.Tensor:
    """blake2b-128 of the file bytes as two int64 (collatable, gatherable like a label)."""
    digest = hashlib.blake2b(data, digest_size=16).digest()
    return torch.from_numpy(np.frombuffer(digest, dtype="<i8").copy())


def hashes_to_hex(h: torch.Tensor) -> list[str]:
    """(n, 2) int64 content hashes → n hex strings."""
    arr = np.ascontiguousarray(h.numpy().astype("<i8"))
    return [row.tobytes().hex() for row in arr]


class ReidImages(Dataset):
    """Images of one split → (3×256×128 normalised tensor, content hash (2,) int64, index).

    PIL bicubic resize straight to 256×128 (no crop, aspect ratio not kept), as the reference
    scripts' ``Resize((256, 128), interpolation=3)``. The file is read once: its bytes are
    hashed (for --junk-identical and duplicate reports) and decoded from memory.
    """

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        path = self.paths[i]
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                too_big = pixel_problem(im.width, im.height, MAX_IMAGE_PIXELS)
                if too_big:  # sizes from the header: refused before anything is allocated
                    raise DecodeError(path, too_big, kind="huge")
                im.load()  # decode now: a truncated file fails here, naming the path
                rgb = im.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise DecodeError(path, str(e) or type(e).__name__) from None
        rgb = rgb.resize((IMAGE_SIZE[1], IMAGE_SIZE[0]), Image.Resampling.BICUBIC)
        x = TF.normalize(TF.to_tensor(rgb), IMAGENET_MEAN, IMAGENET_STD)
        return x, _hash_as_int64(data), i
