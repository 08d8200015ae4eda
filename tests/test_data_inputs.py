"""Hostile data inputs: list files that lead out of the data root, absurd labels, enormous
lines, huge and multi-frame images, an unwritable cache, a file where a folder belongs.

Each user mistake must be one line (what, where, how to fix), under 300 characters; what a
user sees from the CLI is checked in a subprocess, exactly as they would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslctl import UserError, api
from sslctl.data import index as ix
from sslctl.data import readers
from sslctl.data.listfile import MAX_LABEL, read_list_file
from sslctl.data.readers import DecodeError, Skipped, load_rgb, scan_imagefolder
from sslctl.data.select import data_folder, prepare_index
from sslctl.data.text import quote
from sslctl.data.tv import EvalDataset, PretrainDataset, TwoViewTransform, preflight
from sslctl.data.views import ViewSpec, reid
from sslctl.dist import DistInfo

TIMEOUT = 120


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SSLCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(readers, "_warned", set())  # warn_once: every test starts afresh
    return tmp_path / "cache"


def _img(path: Path, size: tuple[int, int] = (20, 16), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def _cli(*args: str, cache: Path, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "SSLCTL_CACHE": str(cache), "COLUMNS": "300"}
    return subprocess.run(
        [sys.executable, "-m", "sslctl", "data", "check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _one_line(msg: str, limit: int = 300) -> str:
    """``msg`` is a single line under ``limit`` characters; returned with spaces collapsed."""
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    assert len(msg.strip()) < limit, (len(msg), msg[:400])
    return " ".join(msg.split())


def _list_refused(lst: Path, text: str, root: Path) -> str:
    """``lst``, written with ``text``, is refused by read_list_file: the error's one line."""
    lst.write_text(text)
    with pytest.raises(UserError) as e:
        read_list_file(lst, root)
    return _one_line(str(e.value))


def _error_line(res: subprocess.CompletedProcess) -> str:
    """The CLI's user error: exit 2, one line on stderr (Rich may fold it at the terminal
    width, so the folds are joined first), no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    err = " ".join(res.stderr.split())
    assert err.startswith("error: ") and len(err) < 310, err[:600]
    return err


# ----------------------------------------------------------------------------- quoting


def test_quote_shortens_and_escapes() -> None:
    assert quote("data/a b.jpg") == "data/a b.jpg"
    assert quote(Path("/x/y.png")) == "/x/y.png"
    long = "a" * 5000
    q = quote(long)
    assert q == "a" * 200 + "… (5,000 characters)"
    assert quote(long, 10) == "a" * 10 + "… (5,000 characters)"
    assert quote("a\nb\x00c\u2028d") == "a\\nb\\x00c\\u2028d"  # cannot split the line
    assert quote(os.fsdecode(b"caf\xff.jpg")) == "caf\\udcff.jpg"  # prints on any console
    assert quote("\x00" * 300).endswith("… (300 characters)")


# ----------------------------------------------------------------------------- list files


@pytest.mark.parametrize(
    "entry",
    ["../../etc/passwd", "/dev/zero", "/proc/self/environ", "sub/../../outside.png"],
)
def test_list_entry_outside_the_root_is_refused(tmp_path: Path, entry: str) -> None:
    root = tmp_path / "data"
    _img(root / "a.png")
    _img(tmp_path / "outside.png")
    msg = _list_refused(tmp_path / "list.txt", f"a.png 0\n# comment\n{entry} 1\n{entry} 2\n", root)
    assert f"line 3: {entry} is outside the data root (2 such entries)" in msg
    assert "outside the data root" in msg and "data.allow_outside_root=true" in msg


def test_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    _img(root / "c" / "a.png")
    secret = _img(outside / "secret.png")
    os.symlink(secret, root / "c" / "link.png")  # the file itself is a link out
    os.symlink(outside, root / "linked")  # a folder on the way is
    os.symlink("a.png", root / "c" / "inside.png")  # a link within the root is fine
    lst = tmp_path / "list.txt"
    msg = _list_refused(lst, "c/a.png 0\nc/inside.png 0\nc/link.png 1\n", root)
    assert "line 3: c/link.png is outside the data root through a symlink (1 such entry)" in msg
    lst.write_text("c/a.png 0\nlinked/secret.png 1\n")
    with pytest.raises(UserError, match=r"line 2: linked/secret\.png is outside .* through a sym"):
        read_list_file(lst, root)
    lst.write_text("c/a.png 0\nc/inside.png 1\n")
    assert [y for _, y in read_list_file(lst, root)] == [0, 1]


def test_allow_outside_root_takes_absolute_paths_on_purpose(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _img(root / "a.png")
    other = _img(tmp_path / "shared" / "b.png")
    lst = tmp_path / "list.txt"
    lst.write_text(f"a.png 0\n{other} 1\n../shared/b.png 2\n/dev/zero 3\n")
    skipped = Skipped()
    samples = read_list_file(lst, root, skipped, allow_outside_root=True)
    assert samples == [
        (str(root / "a.png"), 0),
        (str(other), 1),
        (str(root / "../shared/b.png"), 2),
    ]
    assert skipped.special == 1  # /dev/zero: a device, still never opened


@pytest.mark.slow
def test_cli_refuses_outside_entries_unless_allowed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _img(root / "a.png")
    other = _img(tmp_path / "shared" / "b.png")
    (root / "list.txt").write_text(f"a.png 0\n../../etc/passwd 1\n{other} 2\n")
    res = _cli(str(root), "--list-file", "list.txt", cache=tmp_path / "cache")
    err = _error_line(res)
    assert "line 2: ../../etc/passwd is outside the data root (2 such entries)" in err
    assert "--allow-outside-root" in err
    (root / "list.txt").write_text(f"a.png 0\n{other} 2\n")
    r = api.data_check(root, Path("list.txt"), allow_outside_root=True)
    assert (r.total, r.usable) == (2, 2)


@pytest.mark.parametrize("label", ["1000000000000", "1000000", "-2", "-1000000000000"])
def test_absurd_label_is_refused_with_its_line(tmp_path: Path, label: str) -> None:
    _img(tmp_path / "a.png")
    msg = _list_refused(tmp_path / "list.txt", f"a.png 3\n\na.png {label}\n", tmp_path)
    assert f"line 3: label {label} is not a class index (-1..999,999; -1 = no label)" in msg


def test_labels_at_the_documented_bounds_are_read(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    lst = tmp_path / "list.txt"
    lst.write_text(f"a.png {MAX_LABEL - 1}\na.png -1\na.png\n")
    assert [y for _, y in read_list_file(lst, tmp_path)] == [999_999, -1, 0]


@pytest.mark.slow
def test_a_50_mb_line_prints_one_short_warning(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _img(root / "a.png")
    n = 50_000_000
    with open(root / "list.txt", "w") as fh:
        fh.write("a.png 0\n")
        fh.write("x" * n + " 1\n")
    res = _cli(str(root), "--list-file", "list.txt", cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.stdout) + len(res.stderr) < 10_000  # not 100 MB
    warns = [ln for ln in " ".join(res.stderr.split()).split("warning: ")[1:]]
    assert len(warns) == 1, res.stderr
    assert "skipped 1 list entry with a path over 4,096 characters" in warns[0]
    assert f"(first: line 2, {'x' * 60}… ({n:,} characters))" in warns[0]
    assert "1 images, 1 usable" in " ".join(res.stdout.split())
    # the same line with a label that is not a number: one error line, shortened
    with open(root / "list.txt", "w") as fh:
        fh.write("a.png 0\n" + "x" * n + " one\n")
    err = _error_line(_cli(str(root), "--list-file", "list.txt", cache=tmp_path / "cache"))
    assert (
        f"line 2: expected 'relative/path' or 'relative/path LABEL' (LABEL an integer), got '{'x' * 100}… ("
        in err
    )


def test_long_names_and_nul_bytes_are_quoted_in_one_line(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    lst = tmp_path / "list.txt"
    lst.write_text("bad\x00name.png 1\na.png 0\n")  # the NUL case: read, never a ValueError
    with pytest.raises(UserError) as e:
        read_list_file(lst, tmp_path)
    assert "line 1: " in e.value.args[0] and "bad\\x00name.png not found" in _one_line(str(e.value))
    lst.write_text("a.png 0\nbad\x00name.png 1\n")
    samples = read_list_file(lst, tmp_path)
    assert len(samples) == 2
    with pytest.raises(DecodeError) as d:
        load_rgb(samples[1][0])
    assert "\\x00" in _one_line(str(d.value))
    long = tmp_path / ("n" * 300 + ".png")  # too long for the file system: ENAMETOOLONG
    with pytest.raises(DecodeError) as d:
        load_rgb(long)
    msg = _one_line(str(d.value))
    # the path once, shortened; the reason without the path an OSError's text repeats
    assert msg.endswith(f"… ({len(str(long)):,} characters): File name too long")


# ----------------------------------------------------------------------------- huge images


def _huge_png(path: Path, side: int) -> Path:
    """A side×side 1-bit PNG: a few kB on disk, side² / 8 bytes when decoded."""
    Image.new("1", (side, side), 0).save(path)
    return path


@pytest.mark.slow
def test_real_12000_square_png_is_not_a_raw_pil_warning(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _img(root / "a.png")
    big = _huge_png(root / "big.png", 12000)
    assert big.stat().st_size < 100_000
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert ix.check_file(str(big)).kind == "grayscale"  # 144 M pixels: under the default
        huge = ix.check_file(str(big), max_image_pixels=100_000_000)
        with Image.open(big) as img:  # PIL's own check is off wherever sslctl.data is loaded
            assert img.size == (12000, 12000)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert (huge.kind, huge.width, huge.height) == ("huge", 12000, 12000)
    assert "12,000×12,000 = 144,000,000 pixels, over the limit of 100,000,000" in huge.reason
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = api.data_check(root)
    assert (r.usable, r.checked) == (2, 2)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    res = _cli(str(root), "--max-image-pixels", "100000000", cache=tmp_path / "cache")
    out = " ".join(res.stdout.split())
    assert res.returncode == 0 and "DecompressionBomb" not in res.stdout + res.stderr
    assert "huge │ 1 │ skipped, never decoded (over --max-image-pixels)" in out
    assert "0 file(s) decoded now" in out  # judged from the cached width × height
    assert f"huge {big} (12,000×12,000 = 144,000,000 pixels, over the limit of 100,000,000" in out
    r = api.data_check(root)  # the default limit again: the file is decoded once more
    assert (r.usable, r.checked) == (2, 1)


def test_limit_above_pils_own_refusal_is_honoured(tmp_path: Path) -> None:
    big = _huge_png(tmp_path / "big.png", 14000)  # 196 M pixels: PIL alone would refuse it
    assert ix.check_file(str(big)).kind == "huge"
    assert ix.check_file(str(big), max_image_pixels=200_000_000).kind == "grayscale"


def test_lowered_limit_on_small_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    small = [_img(tmp_path / f"s{i}.png", (20, 16), seed=i) for i in range(3)]
    big = [_img(tmp_path / f"b{i}.png", (64, 64), seed=9 + i) for i in range(2)]
    with pytest.raises(DecodeError) as e:
        load_rgb(big[0], max_image_pixels=1000)
    assert e.value.kind == "huge" and "64×64 = 4,096 pixels, over the limit of 1,000" in str(
        e.value
    )
    assert load_rgb(small[0], max_image_pixels=1000).size == (20, 16)
    samples = [(str(p), 0) for p in (small[0], big[0], big[1], small[1], small[2])]
    plain = ViewSpec(size=8, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    ds = PretrainDataset(samples, TwoViewTransform(plain, plain), max_image_pixels=1000)
    assert ds.item(0, 1)[2] and ds.item(0, 2)[2] and not ds.item(0, 0)[2]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(lines) == 1 and str(big[0]) in lines[0] and "skipped without a warning" in lines[0]
    with pytest.raises(DecodeError, match="over the limit"):
        EvalDataset(samples, reid(16, 8), max_image_pixels=1000)[1]
    assert isinstance(EvalDataset(samples, reid(16, 8))[1][0], torch.Tensor)
    good, bad = preflight(samples, max_image_pixels=1000)
    assert [p for p, _ in bad] == [str(big[0]), str(big[1])] and len(good) == 3
    assert "over the limit of 1,000" in bad[0][1]


@pytest.mark.slow
def test_cli_max_image_pixels(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _img(root / "c" / "s.png", (20, 16))
    _img(root / "c" / "b.png", (64, 64))
    res = _cli(str(root), "--max-image-pixels", "1000", cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "2 images, 1 usable" in out and "huge │ 1 │" in out
    with pytest.raises(UserError, match="--max-image-pixels must be >= 1"):
        api.data_check(root, max_image_pixels=0)


def test_prepare_index_warns_once_per_skipped_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "data"
    for i in range(3):
        _img(root / f"b{i}.png", (64, 64), seed=i)
    _img(root / "s.png")
    samples, _ = scan_imagefolder(root)
    di = DistInfo(0, 1, 0, torch.device("cpu"))
    index = prepare_index(samples, root, None, di, max_image_pixels=1000)
    assert int(index.usable().sum()) == 1
    err = capsys.readouterr().err  # folded at the console's width: compared word by word
    warns = " ".join(err.split()).split("warning: ")[1:]
    assert len(warns) == 1
    assert warns[0].startswith("data: 3 image(s) over data.max_image_pixels (never decoded), ")
    assert "b0.png;" in warns[0] and "64×64 = 4,096 pixels, over the limit of 1,000" in warns[0]


# ----------------------------------------------------------------------------- multi-frame

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _animated(path: Path, fmt: str) -> Path:
    frames = [Image.new("RGB", (8, 6), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=50)
    return path


def test_multi_frame_files_use_frame_zero_as_rgb(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    gif = _animated(tmp_path / "anim.gif", "GIF")
    apng = _animated(tmp_path / "anim.png", "PNG")
    with Image.open(gif) as img:
        assert img.n_frames == 3 and img.mode == "P"  # palette frames: a conversion is needed
    for path in (gif, apng, gif):
        img = load_rgb(path)
        assert img.mode == "RGB" and img.size == (8, 6)
        assert np.array_equal(np.asarray(img), np.full((6, 8, 3), RED, np.uint8)), path
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(lines) == 1 and "has several frames" in lines[0] and "first frame" in lines[0]
    for path in (gif, apng):
        c = ix.check_file(str(path))
        assert (c.kind, c.width, c.height) == ("multi-frame", 8, 6)
        assert c.reason.startswith("3 frames: the torchvision backend uses the first")


@pytest.mark.slow
def test_cli_counts_multi_frame_files(tmp_path: Path) -> None:
    root = tmp_path / "data" / "c"
    root.mkdir(parents=True)
    _img(root / "a.png")
    _animated(root / "anim.png", "PNG")
    _animated(root / "anim2.webp", "WEBP")
    res = _cli(str(root.parent), cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "3 images, 1 usable" in out
    assert "multi-frame │ 2 │ first frame used (torchvision); skipped by DALI" in out


# ----------------------------------------------------------------------------- the cache


@pytest.mark.slow
def test_cache_under_a_file_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _img(root / "a.png")
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "sub"
    err = _error_line(_cli(str(root), cache=bad))
    assert f"cannot write the data index under {bad / 'index'} (Not a directory)" in err
    assert "set SSLCTL_CACHE to a writable folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.slow
def test_read_only_cache_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _img(root / "a.png")
    cache = tmp_path / "ro"
    (cache / "index").mkdir(parents=True)
    (cache / "index").chmod(0o555)
    try:
        err = _error_line(_cli(str(root), cache=cache))
    finally:
        (cache / "index").chmod(0o755)
    assert f"under {cache / 'index'} (Permission denied); set SSLCTL_CACHE" in err


def test_unwritable_cache_is_found_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    _img(root / "a.png")

    def denied(*a: object, **k: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    def never(*a: object, **k: object) -> ix.Check:
        raise AssertionError("decoded before the cache was found unwritable")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    monkeypatch.setattr(ix, "check_file", never)
    with pytest.raises(UserError) as e:
        api.data_check(root)
    msg = _one_line(str(e.value))
    assert "(Permission denied); set SSLCTL_CACHE to a writable folder" in msg
    assert str(tmp_path / "cache" / "index") in msg


def test_bundled_set_in_an_unwritable_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sslctl.data import bundled

    def denied(out: Path) -> None:
        raise PermissionError(13, "Permission denied", str(out / "train"))

    monkeypatch.setattr(bundled, "_build", denied)
    with pytest.raises(UserError) as e:
        bundled.bundled_root()
    msg = _one_line(str(e.value))
    assert f"cannot write the demo data set under {tmp_path / 'cache'} (Permission denied)" in msg
    assert os.listdir(tmp_path / "cache") == []  # the temporary copy is gone


# ----------------------------------------------------------------------------- files vs folders


@pytest.mark.slow
def test_a_file_where_the_data_folder_belongs(tmp_path: Path) -> None:
    lst = tmp_path / "train.txt"
    lst.write_text("a.png 0\n")
    with pytest.raises(UserError) as e:
        data_folder(lst)
    msg = _one_line(str(e.value))
    assert msg == (
        f"--data {lst} is a file, not a directory (for a list file use "
        "--set data.list_file=PATH, with --data its root folder)"
    )
    with pytest.raises(UserError, match="does not exist"):
        data_folder(tmp_path / "missing")
    assert data_folder(tmp_path) == tmp_path
    err = _error_line(_cli(str(lst), cache=tmp_path / "cache"))
    assert err == (
        f"error: data folder {lst} is a file, not a directory (for a list file: sslctl data "
        "check ROOT --list-file LIST)"
    )
    with pytest.raises(UserError, match=r"data folder \S+missing does not exist \(pass an"):
        api.data_check(tmp_path / "missing")
    with pytest.raises(UserError, match=f"list file {tmp_path} is not a regular file"):
        api.data_check(tmp_path, tmp_path)
