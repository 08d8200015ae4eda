"""Data readers must not hang: symlink loops and FIFOs in a data set (sslctl.data.readers).

Everything that could hang on a regression (walking a symlink loop, opening a FIFO) runs in a
subprocess with a timeout, so that a failure is a failed test and not a stuck test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TIMEOUT = 60  # seconds; a healthy scan of these trees takes well under one (plus imports)

SCAN = """
import json, sys
from sslctl.data.listfile import read_list_file
from sslctl.data.readers import Skipped, scan_imagefolder
sk = Skipped()
if len(sys.argv) > 2:
    samples, classes = read_list_file(sys.argv[2], sys.argv[1], sk), None
else:
    samples, classes = scan_imagefolder(sys.argv[1], sk)
print(json.dumps({"samples": samples, "classes": classes, "links": sk.dir_links,
                  "special": sk.special}))
"""


def _img(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _run(args: list[str], tmp_path: Path, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "SSLCTL_CACHE": str(tmp_path / "cache"), "COLUMNS": "300"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _scan(root: Path, tmp_path: Path, list_file: Path | None = None) -> tuple[dict, str]:
    """scan_imagefolder (or read_list_file) in a subprocess: (result as JSON, its stderr)."""
    res = _run(["-c", SCAN, str(root), *([str(list_file)] if list_file else [])], tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    out["samples"] = [(str(Path(p).relative_to(root)), y) for p, y in out["samples"]]
    return out, " ".join(res.stderr.split())


def _looped_tree(root: Path) -> None:
    """c0/{a, sub/b}, c1/c, and the two loops of the issue: c0/up -> .. and c0/self -> ."""
    _img(root / "c0" / "a.jpg")
    _img(root / "c0" / "sub" / "b.jpg", 1)
    _img(root / "c1" / "c.jpg", 2)
    os.symlink("..", root / "c0" / "up")
    os.symlink(".", root / "c0" / "self")


def test_symlink_loops_are_read_once_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _looped_tree(root)
    out, err = _scan(root, tmp_path)
    assert out["classes"] == ["c0", "c1"]
    assert out["samples"] == [("c0/a.jpg", 0), ("c0/sub/b.jpg", 0), ("c1/c.jpg", 1)]
    assert (out["links"], out["special"]) == (2, 0)
    assert f"warning: data folder {root}: skipped 2 directory link(s) to a folder already" in err


def test_fifo_named_like_an_image_is_skipped_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _img(root / "c0" / "a.jpg")
    os.mkfifo(root / "c0" / "x.jpg")
    os.symlink("x.jpg", root / "c0" / "y.jpg")  # a link to the FIFO is no better
    os.symlink("gone.jpg", root / "c0" / "z.jpg")  # dangling: kept, data check says unreadable
    out, err = _scan(root, tmp_path)
    assert out["samples"] == [("c0/a.jpg", 0), ("c0/z.jpg", 0)]
    assert (out["links"], out["special"]) == (0, 2)
    assert "skipped 2 image name(s) that are not regular files (FIFO, socket or device" in err


def test_fifo_directly_in_a_flat_folder_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _img(root / "a.jpg")
    os.mkfifo(root / "x.jpg")
    out, _ = _scan(root, tmp_path)
    assert out["classes"] == [""] and out["samples"] == [("a.jpg", 0)] and out["special"] == 1


def test_outside_directory_link_is_followed_once(tmp_path: Path) -> None:
    root, outside = tmp_path / "data", tmp_path / "outside"
    _img(outside / "o.jpg")
    _img(outside / "deep" / "p.jpg", 1)
    _img(tmp_path / "linked_class" / "q.jpg", 2)
    _img(root / "c0" / "a.jpg")
    os.symlink(outside, root / "c0" / "ext")  # a data set linked in
    (root / "c1").mkdir()
    os.symlink(outside, root / "c1" / "again")  # the same folder a second time: skipped
    os.symlink(tmp_path / "linked_class", root / "c2")  # a whole class linked in
    out, err = _scan(root, tmp_path)
    assert out["classes"] == ["c0", "c1", "c2"]
    assert out["samples"] == [
        ("c0/a.jpg", 0),
        ("c0/ext/o.jpg", 0),
        ("c0/ext/deep/p.jpg", 0),
        ("c2/q.jpg", 2),
    ]
    assert (out["links"], out["special"]) == (1, 0)
    assert "skipped 1 directory link(s)" in err


def test_list_file_naming_a_fifo(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _img(root / "a.jpg")
    os.mkfifo(root / "x.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg 3\nx.jpg 1\n")
    out, err = _scan(root, tmp_path, lst)
    assert out["samples"] == [("a.jpg", 3)] and out["special"] == 1
    assert f"warning: list file {lst}: skipped 1 image name(s) that are not regular" in err
    lst.write_text("x.jpg 1\n")
    res = _run(["-c", SCAN, str(root), str(lst)], tmp_path)
    assert res.returncode == 1 and "every entry names a FIFO, socket or device" in res.stderr


def test_decoders_refuse_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    code = (
        "import sys\n"
        "from sslctl.data.index import check_file\n"
        "from sslctl.data.readers import DecodeError, load_rgb\n"
        "print(check_file(sys.argv[1]))\n"
        "try:\n"
        "    load_rgb(sys.argv[1])\n"
        "except DecodeError as e:\n"
        "    print(e)\n"
    )
    res = _run(["-c", code, str(fifo)], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "kind='unreadable'" in res.stdout and "not a regular file" in res.stdout
    assert f"cannot decode image {fifo}: not a regular file" in res.stdout


@pytest.mark.slow
def test_cli_data_check_reports_skips_and_does_not_hang(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _looped_tree(root)
    os.mkfifo(root / "c1" / "x.jpg")
    res = _run(["-m", "sslctl", "data", "check", str(root)], tmp_path)
    assert res.returncode == 0, res.stderr
    out, err = " ".join(res.stdout.split()), " ".join(res.stderr.split())
    assert "3 images, 3 usable" in out and "zero-byte" not in out
    assert (
        "skipped by the scan, not in the index: 2 directory link(s) to a folder already "
        "scanned" in out
    )
    assert "and 1 image name(s) that are not regular files (FIFO, socket or device" in out
    assert f"warning: data folder {root}: skipped 2 directory link(s)" in err
    (root / "list.txt").write_text("c0/a.jpg 0\nc1/x.jpg 1\n")
    res = _run(["-m", "sslctl", "data", "check", str(root), "--list-file", "list.txt"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "1 images, 1 usable" in out and "1 image name(s) that are not regular" in out


@pytest.mark.slow
def test_pretrain_on_a_looped_tree_with_a_fifo_does_not_hang(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(24):
        _img(root / f"c{i % 2}" / f"{i:02d}.jpg", i)
    os.symlink("..", root / "c0" / "up")
    os.symlink(".", root / "c0" / "self")
    os.mkfifo(root / "c1" / "x.jpg")
    args = ["-m", "sslctl", "pretrain", "--profile", "demo-cpu", "--data", str(root)]
    args += ["--out", str(tmp_path / "run"), "--set", "train.batch_size=12"]
    args += ["--set", "eval.knn_every=0", "--max-steps", "1"]
    res = _run(args, tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    err = " ".join(res.stderr.split())
    assert "skipped 2 directory link(s)" in err and "1 image name(s) that are not regular" in err
