"""Readers (folders, list files, odd image files) and the torchvision datasets and loader."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from sslctl import UserError
from sslctl.data import views
from sslctl.data.draws import sample_rng
from sslctl.data.listfile import read_list_file
from sslctl.data.readers import DecodeError, load_rgb, scan_imagefolder
from sslctl.data.tv import EvalDataset, PretrainDataset, PretrainLoader, TwoViewTransform, preflight
from tests.image_helpers import unnormalize


def _img(
    path: Path, colour: tuple[int, int, int] = (200, 30, 60), size: tuple[int, int] = (20, 16)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(
        path, format="PNG" if path.suffix.lower() == ".png" else "JPEG"
    )
    return path


# ----------------------------------------------------------------------------- folders


def test_scan_imagefolder_order_and_filters(tmp_path: Path) -> None:
    for name in (
        "b/2.png",
        "b/10.jpg",
        "a/x.JPEG",
        "a/sub/y.Png",
        "c/z.webp",
        "a/.hidden.jpg",
        ".ipynb_checkpoints/q.jpg",
        "a/notes.txt",
        "b/.cache/w.jpg",
    ):
        p = tmp_path / name
        if p.suffix == ".txt":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("not an image")
        elif p.suffix == ".webp":
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(p, format="WEBP")
        else:
            _img(p)
    (tmp_path / "empty").mkdir()
    samples, classes = scan_imagefolder(tmp_path)
    assert classes == ["a", "b", "c", "empty"]  # empty keeps its index, hidden folders do not count
    rel = [(str(Path(p).relative_to(tmp_path)), y) for p, y in samples]
    assert rel == [
        ("a/x.JPEG", 0),
        ("a/sub/y.Png", 0),
        ("b/10.jpg", 1),
        ("b/2.png", 1),
        ("c/z.webp", 2),
    ]


def test_scan_flat_folder_is_one_class(tmp_path: Path) -> None:
    _img(tmp_path / "b.jpg")
    _img(tmp_path / "a.png")
    samples, classes = scan_imagefolder(tmp_path)
    assert classes == [""]
    assert [Path(p).name for p, _ in samples] == ["a.png", "b.jpg"] and {y for _, y in samples} == {
        0
    }


def test_scan_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        scan_imagefolder(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        scan_imagefolder(tmp_path / "f.txt")
    (tmp_path / "cls").mkdir()
    with pytest.raises(UserError, match="no images found"):
        scan_imagefolder(tmp_path)


# ----------------------------------------------------------------------------- list files


def test_read_list_file(tmp_path: Path) -> None:
    _img(tmp_path / "train" / "n01" / "a.JPEG")
    lst = tmp_path / "list.txt"
    lst.write_text(
        "# ImageNet-style list\n"
        "train/n01/a.JPEG 3\n"
        "\n"
        "   train/n02/b c.JPEG   7  \n"
        "train/n03/no_label.JPEG\n"
        "train/n04/neg.JPEG -1\n"
    )
    samples = read_list_file(lst, tmp_path)
    assert samples == [
        (str(tmp_path / "train/n01/a.JPEG"), 3),
        (str(tmp_path / "train/n02/b c.JPEG"), 7),
        (str(tmp_path / "train/n03/no_label.JPEG"), 0),
        (str(tmp_path / "train/n04/neg.JPEG"), -1),
    ]


def test_read_list_file_errors(tmp_path: Path) -> None:
    _img(tmp_path / "a.jpg")
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 1\n\n# c\na.jpg one\n")
    with pytest.raises(UserError, match=r"bad\.txt, line 4: .*'a\.jpg one'"):
        read_list_file(bad, tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(UserError, match="no entries"):
        read_list_file(empty, tmp_path)
    wrong_root = tmp_path / "l.txt"
    wrong_root.write_text("a.jpg 0\n")
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="relative to the data root"):
        read_list_file(wrong_root, tmp_path / "other")
    with pytest.raises(UserError, match="not found"):
        read_list_file(tmp_path / "missing.txt", tmp_path)


# ----------------------------------------------------------------------------- odd files


def test_load_rgb_odd_but_valid_files(tmp_path: Path) -> None:
    gray = tmp_path / "gray.jpg"
    Image.new("L", (8, 6), 90).save(gray)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    png_as_jpeg = tmp_path / "n0001.JPEG"
    Image.new("RGB", (8, 6), (1, 2, 3)).save(png_as_jpeg, format="PNG")
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 6), (10, 20, 30, 0)).save(rgba)
    pal = tmp_path / "pal.png"
    p = Image.new("P", (8, 6), 1)
    p.putpalette([0, 0, 0, 40, 50, 60] + [0] * 762)
    p.save(pal, transparency=0)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(deep)

    def px(path: Path) -> list[int]:
        img = load_rgb(path)
        assert img.mode == "RGB"
        return list(img.getpixel((0, 0)))  # type: ignore[arg-type]

    assert px(gray)[0] == px(gray)[1] == px(gray)[2] and abs(px(gray)[0] - 90) <= 2
    r, g, b = px(cmyk)
    assert r > 200 and g < 60 and b < 60
    assert px(png_as_jpeg) == [1, 2, 3]
    assert px(rgba) == [10, 20, 30]  # alpha dropped, colour kept (torchvision's loader does so)
    assert px(pal) == [40, 50, 60]
    row = np.asarray(load_rgb(deep))[0, :, 0].tolist()
    assert row == [0, 128, 255]  # 16-bit scaled, not clipped to white


def test_load_rgb_bad_files_raise_decode_error(tmp_path: Path) -> None:
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    good = _img(tmp_path / "big.jpg", size=(64, 64))
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    for path in (zero, truncated, text, tmp_path / "missing.jpg"):
        with pytest.raises(DecodeError) as info:
            load_rgb(path)
        assert info.value.path == str(path) and str(path) in str(info.value) and info.value.reason
    err = DecodeError(str(zero), "empty")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))
    assert isinstance(err, UserError)


# ----------------------------------------------------------------------------- datasets


def _solid_dataset(root: Path, n: int) -> list[tuple[str, int]]:
    """Solid-colour images whose red channel encodes the sample index (for tracing)."""
    return [(str(_img(root / f"{i:03d}.png", (i * 5, 100, 50), (12, 10))), i % 3) for i in range(n)]


def _plain_views(size: int = 8) -> tuple[views.ViewSpec, views.ViewSpec]:
    plain = views.ViewSpec(size=size, jitter_p=0.0, gray_p=0.0, blur_p=0.0, interpolation="nearest")
    return plain, plain


def _index_of(view: torch.Tensor) -> int:
    red = float((unnormalize(view) * 255)[0].mean())
    return round(red / 5)


def test_pretrain_dataset_skips_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = _solid_dataset(tmp_path, 4)
    Path(samples[1][0]).write_bytes(b"")  # zero bytes
    Path(samples[3][0]).write_bytes(Path(samples[3][0]).read_bytes()[:30])  # truncated
    ds = PretrainDataset(samples, TwoViewTransform(*_plain_views()), seed=5)
    v1, v2, sub = ds.item(2, 1)
    assert sub and _index_of(v1) == 2 and _index_of(v2) == 2
    expected = TwoViewTransform(*_plain_views())(load_rgb(samples[2][0]), sample_rng(5, 2, 1))
    assert torch.equal(v1, expected[0])  # views seeded by the original index
    v1, _, sub = ds.item(0, 3)
    assert sub and _index_of(v1) == 0  # wraps around
    assert not ds.item(0, 2)[2]
    ds.item(1, 1)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "cannot decode image" in line]
    assert len(lines) == 2  # once per file, though sample 1 failed twice
    assert samples[1][0] in lines[0] and "empty file" in lines[0] and samples[3][0] in lines[1]


def test_loader_counts_substitutions(tmp_path: Path) -> None:
    samples = _solid_dataset(tmp_path, 6)
    Path(samples[4][0]).write_bytes(b"")
    loader = PretrainLoader(samples, _plain_views(), batch_size=2, rank=0, world=1, seed=0)
    batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch == 3 and loader.substituted == 1
    seen = [_index_of(v) for v1, _ in batches for v in v1]
    assert sorted(seen) == [0, 1, 2, 3, 5, 5]


def test_preflight(tmp_path: Path) -> None:
    samples = _solid_dataset(tmp_path, 5)
    Path(samples[1][0]).write_bytes(b"")
    Path(samples[2][0]).write_text("no image")
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        big
    )
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(big.read_bytes()[: big.stat().st_size // 2])  # header intact, pixels cut
    samples.append((str(trunc), 0))
    good, bad = preflight(samples)
    assert [p for p, _ in bad] == [samples[1][0], samples[2][0]] and len(good) == 4
    good, bad = preflight(samples, full=True)
    assert [p for p, _ in bad] == [samples[1][0], samples[2][0], str(trunc)]
    assert good == [samples[i] for i in (0, 3, 4)]
    assert all(reason for _, reason in bad)


def test_sharding_two_ranks_sees_each_sample_once(tmp_path: Path) -> None:
    samples = _solid_dataset(tmp_path, 23)
    seen = []
    for rank in (0, 1):
        loader = PretrainLoader(samples, _plain_views(), batch_size=3, rank=rank, world=2, seed=4)
        assert loader.steps_per_epoch == 3  # 23 // 2 = 11 per rank, 3 full batches of 3
        got = [_index_of(v) for v1, _ in loader.epoch(1) for v in v1]
        assert got == loader.indices(1)
        ref: DistributedSampler[int] = DistributedSampler(
            loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=4, drop_last=True
        )
        ref.set_epoch(1)
        assert got == list(ref)[:9]
        seen += got
        assert loader.indices(2) != loader.indices(1)  # reshuffled every epoch
    assert len(seen) == len(set(seen)) == 18


def _noise_images(root: Path, n: int, shape: tuple[int, int], suffix: str, seed: int) -> list:
    """n random-noise images (one class) as (path, 0) samples."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        path = root / f"{i}{suffix}"
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), 0))
    return samples


def test_resume_mid_epoch_gives_the_same_batches(tmp_path: Path) -> None:
    samples = _noise_images(tmp_path, 20, (20, 24), ".png", seed=0)
    spec_pair = views.byol_views(size=12, scale_min=0.2)
    full = list(PretrainLoader(samples, spec_pair, 4, seed=9, workers=0).epoch(3))
    resumed = list(PretrainLoader(samples, spec_pair, 4, seed=9, workers=2).epoch(3, start_batch=2))
    assert len(full) == 5 and len(resumed) == 3
    for (a1, a2), (b1, b2) in zip(full[2:], resumed, strict=True):
        assert a1.shape == (4, 3, 12, 12) and a1.dtype == torch.float32
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(
        full[0][0], list(PretrainLoader(samples, spec_pair, 4, seed=9).epoch(4))[0][0]
    )


def test_uint8_views_normalised_after_transfer_equal_the_float_path(tmp_path: Path) -> None:
    """On a GPU the workers ship uint8 views (4× less traffic) and the loader normalises them
    on the device; the result must equal the float32 views of the CPU path, bit for bit (the
    same multiply-add; the CPU stands in for the device here)."""
    samples = _noise_images(tmp_path, 12, (30, 40), ".jpg", seed=1)
    spec_pair = views.byol_views(size=16, scale_min=0.2)
    floats = list(PretrainLoader(samples, spec_pair, 4, seed=3, workers=0).epoch(1))
    shipped = PretrainLoader(
        samples, spec_pair, 4, seed=3, workers=2, normalize_on=torch.device("cpu")
    )
    raw = shipped.dataset.item(1, 0)
    assert raw[0].dtype == torch.uint8  # what crosses the process boundary
    got = list(shipped.epoch(1))
    assert len(got) == len(floats) == 3
    for (a1, a2), (b1, b2) in zip(floats, got, strict=True):
        assert b1.dtype == torch.float32 and torch.equal(a1, b1) and torch.equal(a2, b2)


def test_loader_too_few_samples_is_a_user_error(tmp_path: Path) -> None:
    samples = _solid_dataset(tmp_path, 7)
    with pytest.raises(UserError, match=r"7 images over 2 rank\(s\) give 3 per rank.*batch of 4"):
        PretrainLoader(samples, _plain_views(), batch_size=4, rank=1, world=2)


def test_eval_dataset(tmp_path: Path) -> None:
    samples = _solid_dataset(tmp_path, 3)
    ds = EvalDataset(samples, views.reid(16, 8))
    x, label, index = ds[2]
    assert x.shape == (3, 16, 8) and label == 2 and index == 2 and _index_of(x) == 2
    Path(samples[1][0]).write_bytes(b"")
    with pytest.raises(DecodeError, match=Path(samples[1][0]).name):
        ds[1]
    center = EvalDataset(samples, views.linear_val(8, 10))
    assert center[0][0].shape == (3, 8, 8)
    # Raised in a worker, it reaches the main process as one readable line for the CLI.
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    with pytest.raises(DecodeError) as info:
        next(iter(loader))
    assert str(info.value) == f"cannot decode image {samples[1][0]}: empty file"
