"""The DALI backend against the torchvision backend: views, odd files, sharding, resume.

CPU pipelines (device_id=None) run everywhere DALI is installed; the GPU ("mixed") ones are
marked gpu and skipped without CUDA. Both backends draw the same per-sample parameters, so
most checks compare the two renderings sample by sample, from the output pixels.
"""

from __future__ import annotations

import colorsys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from sslctl import api  # noqa: E402
from sslctl.data import dali as D  # noqa: E402
from sslctl.data import dali_graph as G  # noqa: E402
from sslctl.data import dali_runner as R  # noqa: E402
from sslctl.data.index import KINDS, USABLE, index_path  # noqa: E402
from sslctl.data.readers import load_rgb, scan_imagefolder  # noqa: E402
from sslctl.data.tv import PretrainLoader  # noqa: E402
from sslctl.data.views import (  # noqa: E402
    ViewSpec,
    byol_views,
    view_pair,
)
from tests.dali_helpers import CPU, index_of, render_both, uint8_views  # noqa: E402
from tests.image_helpers import blocks, save_png  # noqa: E402

pytestmark = pytest.mark.dali
gpu = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSLCTL_CACHE", str(tmp_path / "cache"))


def only(**kw: object) -> tuple[ViewSpec, ViewSpec]:
    """A pair of views with every random step off except those in ``kw``."""
    off = ViewSpec(size=32, flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    spec = replace(off, **kw)  # type: ignore[arg-type]
    return spec, spec


# ----------------------------------------------------------------------------- geometry


def test_crop_area_aspect_and_flip_match_torchvision(tmp_path: Path) -> None:
    """A coordinate-coded image (R = 4x, G = 5y): each output view's corners tell where its
    crop came from; histograms of crop area and aspect ratio (and the flip rate) agree."""
    y, x = np.mgrid[0:48, 0:64]
    img = save_png(tmp_path / "grad.png", np.stack([4 * x, 5 * y, np.full_like(x, 128)], -1))
    specs = only(size=32, flip_p=0.5)
    d, t = render_both(img, 96, specs)

    def geometry(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dx = (v[:, :, -1, 0].mean(1) - v[:, :, 0, 0].mean(1)) / 4.0  # R right − left
        dy = (v[:, -1, :, 1].mean(1) - v[:, 0, :, 1].mean(1)) / 5.0
        w, h = np.abs(dx) * 32 / 31, dy * 32 / 31  # centres of edge pixels → crop edges
        return w * h / (64 * 48), np.log(w / h), dx < 0

    for k in range(2):
        (ad, rd, fd), (at, rt, ft) = geometry(d[k]), geometry(t[k])
        assert np.abs(ad - at).max() < 0.03
        assert np.abs(rd - rt).max() < 0.08
        assert np.array_equal(fd, ft) and 0.3 < fd.mean() < 0.7
        bins = np.linspace(0, 1, 6)
        assert np.abs(np.histogram(ad, bins)[0] - np.histogram(at, bins)[0]).sum() <= 4
        assert ad.min() > 0.03 and ad.max() < 1.05 and 0.35 < ad.mean() < 0.75
        assert np.abs(rd).max() < np.log(4 / 3) + 0.08


# ----------------------------------------------------------------------------- coin flips


def test_grayscale_fraction(tmp_path: Path) -> None:
    img = blocks(tmp_path / "c.png")
    d, t = render_both(img, 128, byol_views(32, 0.5))
    for k in range(2):
        gd = np.abs(np.diff(d[k], axis=3)).max(axis=(1, 2, 3)) <= 1.5
        gt = np.abs(np.diff(t[k], axis=3)).max(axis=(1, 2, 3)) <= 1.5
        assert (gd == gt).mean() >= 0.98
        assert 0.1 <= gd.mean() <= 0.32  # p = 0.2 (128 draws: ±0.1 is > 2.5 σ)


def test_solarised_second_views(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img = save_png(tmp_path / "bright.png", rng.integers(190, 250, (32, 32, 3)))
    s1, s2 = (replace(s, jitter_p=0.0) for s in byol_views(32, 0.5))
    d, t = render_both(img, 128, (s1, s2))
    for k, expected in ((0, (0.0, 0.0)), (1, (0.1, 0.32))):
        sd, st = d[k].mean(axis=(1, 2, 3)) < 128, t[k].mean(axis=(1, 2, 3)) < 128
        assert np.array_equal(sd, st)
        assert expected[0] <= sd.mean() <= expected[1]


def test_blurred_views(tmp_path: Path) -> None:
    """Blur shows as lost high-frequency energy on a noise image rendered without resampling
    (full-image crop to the same size): σ ~ U(0.1, 2) with p 1.0 (view 1) and 0.1 (view 2)."""
    rng = np.random.default_rng(2)
    img = save_png(tmp_path / "noise.png", rng.integers(0, 256, (32, 32, 3)))
    base = only(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))[0]
    specs = (replace(base, blur_p=1.0), replace(base, blur_p=0.1))
    d, t = render_both(img, 128, specs)
    src = np.asarray(Image.open(img), np.float32)

    def blurred(v: np.ndarray) -> np.ndarray:
        lap = lambda a: np.abs(np.diff(a, 2, axis=-2)).mean(axis=(-1, -2, -3))  # noqa: E731
        return lap(v) < 0.8 * lap(src)

    bd1, bt1, bd2, bt2 = blurred(d[0]), blurred(t[0]), blurred(d[1]), blurred(t[1])
    assert (bd1 == bt1).mean() >= 0.95 and (bd2 == bt2).mean() >= 0.97
    assert 0.6 <= bd1.mean() <= 1.0  # σ below ~0.4 hardly blurs: p(detectable) ≈ 0.8
    assert 0.02 <= bd2.mean() <= 0.2


# ----------------------------------------------------------------------------- colour jitter


def _hue(v: np.ndarray) -> np.ndarray:
    flat = v.reshape(-1, 3) / 255.0
    return np.array([colorsys.rgb_to_hsv(*np.clip(p, 0, 1))[0] for p in flat]).reshape(v.shape[:-1])


def test_colour_jitter_ranges_match_torchvision(tmp_path: Path) -> None:
    """Each adjustment alone, p = 1: per-sample factors measured from the pixels agree."""
    img = blocks(tmp_path / "c.png", lo=50, hi=170)
    src = np.asarray(Image.open(img), np.float32)
    full = dict(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=1.0)
    zero = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)

    def chroma(a: np.ndarray) -> np.ndarray:
        return (a.max(-1) - a.min(-1)).mean(axis=(-1, -2))

    checks = {
        "brightness": (lambda a: a.mean(axis=(1, 2, 3)) / src.mean(), 0.02, (0.6, 1.4)),
        "contrast": (lambda a: a.std(axis=(1, 2, 3)) / src.std(), 0.03, (0.6, 1.4)),
        "saturation": (lambda a: chroma(a) / chroma(src), 0.03, (0.8, 1.2)),
    }
    for name, (measure, tol, (lo, hi)) in checks.items():
        d, t = render_both(img, 64, only(**{**full, **zero, name: 0.4 if lo < 0.7 else 0.2}))
        md, mt = measure(d[0]), measure(t[0])
        assert np.abs(md - mt).max() < tol, name
        assert lo - 0.02 <= md.min() < lo + 0.12 and hi - 0.12 < md.max() <= hi + 0.02, name
    d, t = render_both(img, 24, only(**{**full, **zero, "hue": 0.1}))
    h0 = _hue(src)

    def shift(v: np.ndarray) -> np.ndarray:  # mean circular hue shift, degrees
        return np.degrees(np.angle(np.exp(2j * np.pi * (_hue(v) - h0)).mean(axis=(1, 2))))

    sd, st = shift(d[0]), shift(t[0])
    assert np.abs(sd - st).max() < 8.0  # DALI rotates hue linearly in YIQ, torchvision in HSV
    assert np.abs(st).max() <= 36.5 and np.abs(sd).max() <= 42.0
    assert np.corrcoef(sd, st)[0, 1] > 0.95


def test_normalised_output_statistics_match(tmp_path: Path) -> None:
    img = blocks(tmp_path / "c.png", size=48)
    samples = [(str(img), 0)] * 64
    index = index_of(samples, tmp_path)
    specs = byol_views(32, 0.2)
    d = next(iter(D.DaliPretrainLoader(samples, specs, 64, index, options=CPU).epoch(0)))
    t = next(iter(PretrainLoader(samples, specs, 64).epoch(0)))
    for vd, vt in zip(d, t, strict=True):
        assert vd.dtype == torch.float32 and vd.shape == vt.shape == (64, 3, 32, 32)
        md, mt = vd.mean(dim=(0, 2, 3)), vt.mean(dim=(0, 2, 3))
        sd, st = vd.std(dim=(0, 2, 3)), vt.std(dim=(0, 2, 3))
        # DALI's YIQ hue rotation pulls colours slightly toward grey where torchvision's HSV
        # shift keeps saturation (≈ 3 levels of 255 on this saturated image): 0.1 here is
        # 6 levels; a channel-order or normalisation mistake moves these by > 0.3.
        assert torch.allclose(md, mt, atol=0.1), (md, mt)
        assert torch.allclose(sd, st, atol=0.06), (sd, st)


def test_views_without_jitter_match_pixel_for_pixel(tmp_path: Path) -> None:
    """Crop, flip, grayscale, blur and solarisation: the same image within a few levels."""
    img = blocks(tmp_path / "c.png", size=48)
    specs = tuple(replace(s, jitter_p=0.0) for s in byol_views(32, 0.2))
    d, t = render_both(img, 32, specs)  # type: ignore[arg-type]
    for k in range(2):
        assert np.abs(d[k] - t[k]).mean() < 3.0
        assert np.median(np.abs(d[k] - t[k]).mean(axis=(1, 2, 3))) < 2.0


# ----------------------------------------------------------------------------- odd files


def _odd_folder(root: Path) -> list[tuple[str, int]]:
    from tests.image_helpers import make_odd_folder

    make_odd_folder(root)
    for i in range(6):  # enough usable images for a few batches
        blocks(root / "x" / f"b{i}.png", seed=i)
    samples, _ = scan_imagefolder(root)
    return samples


def test_dali_decodes_every_usable_kind_like_pil(tmp_path: Path) -> None:
    """The index decides with PIL; DALI's CPU decoder must agree on every kind: same pixels
    for the usable ones, a failure for the others (so no unusable file can reach DALI)."""
    samples = _odd_folder(tmp_path / "d")
    index = index_of(samples, tmp_path / "d")
    usable = index.usable()
    paths = [p for p, _ in samples]
    failures = R.dali_decode_failures(paths)
    assert set(failures) == {p for p, u in zip(paths, usable, strict=True) if not u}
    runner = R.Runner(G.probe_graph, 1, R.DaliOptions(threads=1, prefetch=1))
    good = [p for p, u in zip(paths, usable, strict=True) if u]
    runner.start(
        [np.array([k]) for k in range(len(good))],
        lambda k: ([np.fromfile(good[int(k[0])], np.uint8)],),
    )
    for p in good:
        (img,) = runner.next()
        assert np.array_equal(img[0].numpy(), np.asarray(load_rgb(p))), p


def test_odd_files_pass_through_both_backends(tmp_path: Path) -> None:
    samples = _odd_folder(tmp_path / "d")
    index = index_of(samples, tmp_path / "d")
    specs = byol_views(16, 0.5)
    dl = D.DaliPretrainLoader(samples, specs, 4, index, seed=3, options=CPU)
    tl = PretrainLoader(samples, specs, 4, seed=3)
    assert dl.steps_per_epoch == tl.steps_per_epoch == len(samples) // 4
    for (d1, d2), (t1, _) in zip(dl.epoch(0), tl.epoch(0), strict=True):
        assert torch.isfinite(d1).all() and torch.isfinite(d2).all()
        assert d1.shape == t1.shape == (4, 3, 16, 16)
    seen = dl.indices(0)
    kinds = [KINDS[index.kind[i]] for i in seen]
    skipped = sum(k not in USABLE for k in kinds)
    assert dl.substituted == skipped >= 4
    # PIL also reads the GIF behind a .jpg name, DALI does not: only DALI replaces it
    assert tl.substituted == skipped - kinds.count("other-format")


def test_a_file_broken_after_the_index_is_skipped_at_run_time(tmp_path: Path) -> None:
    root = tmp_path / "d"
    paths = [blocks(root / "c" / f"{i:02d}.png", seed=i) for i in range(12)]
    samples = [(str(p), 0) for p in paths]
    index = index_of(samples, root)
    full = paths[5].read_bytes()
    paths[5].write_bytes(full[: len(full) // 3])  # the index still calls it usable
    dl = D.DaliPretrainLoader(samples, only(size=16), 4, index, options=CPU)
    seen = []
    for _ in dl.epoch(0):
        assert dl.last_indices is not None
        seen += dl.last_indices.tolist()
    assert sorted(seen) == list(range(12))  # the sample keeps its place (next image's pixels)
    assert not dl.usable[5] and dl.substituted == 1
    assert sum(1 for _ in dl.epoch(1)) == 3


def test_run_time_failures_are_probed_with_the_loaders_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvJPEG rejects some files that the CPU decoder accepts: the probe that finds the culprit
    must use the loader's own decoder and device, or such a file would end the run."""
    root = tmp_path / "d"
    paths = [blocks(root / "c" / f"{i:02d}.png", seed=i) for i in range(8)]
    samples = [(str(p), 0) for p in paths]
    index = index_of(samples, root)
    full = paths[2].read_bytes()
    paths[2].write_bytes(full[: len(full) // 3])
    dl = D.DaliPretrainLoader(samples, only(size=16), 4, index, options=CPU)
    dl._runner.options = replace(dl._runner.options, device_id=3)  # marks the probe's origin
    calls: list[tuple[bool, int]] = []
    real = R.dali_decode_failures

    def recording(paths: list[str], gpu: bool = False, device_id: int = 0) -> dict[str, str]:
        calls.append((gpu, device_id))
        return real(paths)  # decode on the CPU here: no GPU in this test

    monkeypatch.setattr(D, "dali_decode_failures", recording)
    assert sum(1 for _ in dl.epoch(0)) == 2
    assert calls == [(False, 3)] and not dl.usable[2]


def test_feed_ahead_thread_gives_the_same_batches_and_stops_with_the_epoch(
    tmp_path: Path,
) -> None:
    """The pipeline runs on a background thread ahead of training: same batches, same order
    as on the caller's thread; an abandoned epoch (max_steps, a signal) ends the thread."""
    import threading

    samples = _coded_folder(tmp_path / "d", 24)
    index = index_of(samples, tmp_path / "d")
    inline = replace(CPU, feed_ahead=0)
    a = [
        _decoded_indices(v1)
        for v1, _ in D.DaliPretrainLoader(samples, only(size=8), 4, index, options=inline).epoch(1)
    ]
    dl = D.DaliPretrainLoader(samples, only(size=8), 4, index, options=CPU)
    assert CPU.feed_ahead > 0
    b = [_decoded_indices(v1) for v1, _ in dl.epoch(1)]
    assert a == b and len(a) == 6
    before = threading.active_count()
    it = dl.epoch(2)
    next(it)
    assert threading.active_count() == before + 1  # the feed thread runs ahead
    it.close()  # abandoned mid-epoch
    assert threading.active_count() == before
    assert [_decoded_indices(v1) for v1, _ in dl.epoch(2, start_batch=1)] == [
        _decoded_indices(v1)
        for v1, _ in D.DaliPretrainLoader(samples, only(size=8), 4, index, options=inline).epoch(
            2, start_batch=1
        )
    ]


def test_an_epoch_cut_short_by_accumulation_reuses_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine trains on whole accumulation cycles only (ImageNet on 8 GPUs at 196: 816 of
    817 micro-batches). Said with ``end_batch``, the pipeline ends cleanly and the next epoch
    reuses it; abandoning it instead would rebuild DALI's pipeline every epoch."""
    samples = _coded_folder(tmp_path / "d", 20)  # 5 batches of 4 per epoch
    index = index_of(samples, tmp_path / "d")
    builds = {"n": 0}
    real = R.Runner._build

    def counted(self: R.Runner) -> None:
        builds["n"] += 1
        real(self)

    monkeypatch.setattr(R.Runner, "_build", counted)
    dl = D.DaliPretrainLoader(samples, only(size=8), 4, index, options=CPU)
    got = [[_decoded_indices(v) for v, _ in dl.epoch(e, end_batch=4)] for e in range(3)]
    assert [len(g) for g in got] == [4, 4, 4] and builds["n"] == 1
    assert got[1] == [_decoded_indices(v) for v, _ in dl.epoch(1)][:4]  # the same first batches


def test_channels_last_views_equal_the_nchw_views_without_a_copy(tmp_path: Path) -> None:
    """On the GPU the views are rendered HWC and viewed as channels_last NCHW tensors, so the
    engine's channels_last conversion is free; the values equal the CHW rendering's."""
    samples = _coded_folder(tmp_path / "d", 8)
    index = index_of(samples, tmp_path / "d")
    specs = byol_views(16, 0.3)
    a = list(D.DaliPretrainLoader(samples, specs, 4, index, options=CPU).epoch(0))
    cl = replace(CPU, channels_last=True)
    b = list(D.DaliPretrainLoader(samples, specs, 4, index, options=cl).epoch(0))
    for (a1, a2), (b1, b2) in zip(a, b, strict=True):
        assert b1.shape == a1.shape == (4, 3, 16, 16)
        assert b1.is_contiguous(memory_format=torch.channels_last) and a1.is_contiguous()
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


# ----------------------------------------------------------------------------- order


def _coded_folder(root: Path, n: int) -> list[tuple[str, int]]:
    """n solid-colour PNGs whose colour encodes the sample index."""
    for i in range(n):
        save_png(root / "c" / f"{i:03d}.png", np.full((8, 10, 3), (10 * i, 255 - 10 * i, 77)))
    samples, _ = scan_imagefolder(root)
    return samples


def _decoded_indices(v: torch.Tensor) -> list[int]:
    return [round(float(r) / 10) for r in uint8_views(v)[:, 4, 4, 0]]


def test_two_ranks_see_every_sample_once_like_torchvision(tmp_path: Path) -> None:
    samples = _coded_folder(tmp_path / "d", 22)
    index = index_of(samples, tmp_path / "d")
    specs = only(size=8, scale=(1.0, 1.0))
    per_rank: list[list[int]] = []
    for rank in range(2):
        dl = D.DaliPretrainLoader(samples, specs, 4, index, rank=rank, world=2, seed=5, options=CPU)
        tl = PretrainLoader(samples, specs, 4, rank=rank, world=2, seed=5)
        assert dl.steps_per_epoch == tl.steps_per_epoch == 2  # 11 per rank: drop 3
        assert dl.indices(1) == tl.indices(1)
        got = []
        for v1, v2 in dl.epoch(1):
            assert _decoded_indices(v1) == _decoded_indices(v2) == dl.last_indices.tolist()  # type: ignore[union-attr]
            got += dl.last_indices.tolist()  # type: ignore[union-attr]
        assert got == dl.indices(1)
        per_rank.append(got)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == 16  # 22 − 2 (uneven tail) − 2×3 (partial)
    assert per_rank[0] != sorted(per_rank[0])  # shuffled


def test_resume_mid_epoch_continues_with_the_same_samples_and_views(tmp_path: Path) -> None:
    samples = _coded_folder(tmp_path / "d", 20)
    index = index_of(samples, tmp_path / "d")
    specs = byol_views(8, 0.5)
    dl = D.DaliPretrainLoader(samples, specs, 4, index, seed=2, options=CPU)
    full = [(v1.clone(), v2.clone(), dl.last_indices) for v1, v2 in dl.epoch(3)]
    resumed = D.DaliPretrainLoader(samples, specs, 4, index, seed=2, options=CPU)
    tail = [(v1, v2, resumed.last_indices) for v1, v2 in resumed.epoch(3, start_batch=2)]
    assert len(full) == 5 and len(tail) == 3
    for (a1, a2, ai), (b1, b2, bi) in zip(full[2:], tail, strict=True):
        assert torch.equal(ai, bi) and torch.equal(a1, b1) and torch.equal(a2, b2)
    assert list(resumed.epoch(3, start_batch=5)) == []
    with pytest.raises(ValueError, match="start_batch"):
        next(resumed.epoch(3, start_batch=6))


def test_pipeline_reuse_and_abandoned_epochs(tmp_path: Path) -> None:
    """An epoch consumed to its end reuses the pipeline; an abandoned one (the engine stops at
    --max-steps) must not leak its prefetched batches into the next epoch."""
    samples = _coded_folder(tmp_path / "d", 24)
    index = index_of(samples, tmp_path / "d")
    specs = only(size=8, scale=(1.0, 1.0))
    dl = D.DaliPretrainLoader(samples, specs, 4, index, options=CPU)
    it = dl.epoch(0)
    next(it)  # abandoned after one batch
    got = [_decoded_indices(v1) for v1, _ in dl.epoch(1)]
    assert sum(got, []) == dl.indices(1)
    pipe = dl._runner.pipe
    got = [_decoded_indices(v1) for v1, _ in dl.epoch(2)]
    assert sum(got, []) == dl.indices(2) and dl._runner.pipe is pipe  # reused


def test_epoch_length_and_too_few_images(tmp_path: Path) -> None:
    samples = _coded_folder(tmp_path / "d", 10)
    index = index_of(samples, tmp_path / "d")
    dl = D.DaliPretrainLoader(samples, only(size=8), 3, index, options=CPU)
    assert dl.steps_per_epoch == PretrainLoader(samples, only(size=8), 3).steps_per_epoch == 3
    from sslctl import UserError

    with pytest.raises(UserError, match="fewer than one batch"):
        D.DaliPretrainLoader(samples, only(size=8), 6, index, world=2, options=CPU)


# ----------------------------------------------------------------------------- end to end


def test_pretrain_end_to_end_through_dali_cpu(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(24):
        blocks(root / f"c{i % 2}" / f"{i}.png", size=40, seed=i)
    sets = [
        "data.backend=dali",
        "train.batch_size=12",
        "data.image_size=32",
        "data.workers=1",
        # demo-cpu is convnet4/AdamW/γ 1 at one resolution; this runs the paper's path through DALI
        "model.arch=resnet18",
        "optim.name=lars",
        "optim.lr=1.0",
        "optim.weight_decay=1e-6",
        "loss.gamma=2.0",
        "method.multires=true",
        "method.online_res_min=24",
        "method.online_res_max=32",
        "method.target_res_min=28",
        "method.target_res_max=32",
        "model.proj_hidden=64",
        "model.pred_hidden=64",
        "model.proj_dim=32",
    ]
    res = api.pretrain("demo-cpu", tmp_path / "run", root, sets, fresh=True, max_steps=2)
    assert res.fit.step == 2 and res.fit.checkpoint is not None and res.fit.checkpoint.is_file()
    assert np.isfinite(res.fit.last_loss)
    assert index_path(root).is_file()  # the preflight index was built and cached


# ----------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.parametrize("recipe", ["byol", "simclr", "mocov2"])
def test_gpu_views_match_cpu_views(tmp_path: Path, recipe: str) -> None:
    """Every data.views recipe; SimCLR's ±0.2-turn hue runs the graph's own HSV hue path."""
    img = blocks(tmp_path / "b.png", size=48)
    samples = [(str(img), 0)] * 16
    index = index_of(samples, tmp_path)
    specs = view_pair(recipe, 32, 0.2)
    cpu = next(iter(D.DaliPretrainLoader(samples, specs, 16, index, options=CPU).epoch(0)))
    opts = R.DaliOptions(threads=2, gpu=True, device_id=torch.cuda.current_device())
    dl = D.DaliPretrainLoader(samples, specs, 16, index, options=opts)
    g = next(iter(dl.epoch(0)))
    for a, b in zip(cpu, g, strict=True):
        assert b.is_cuda and b.dtype == torch.float32
        assert (a - b.cpu()).abs().mean() < 0.03  # nvJPEG and GPU kernels round differently
    half = R.DaliOptions(threads=2, gpu=True, half=True, device_id=torch.cuda.current_device())
    h = next(iter(D.DaliPretrainLoader(samples, specs, 16, index, options=half).epoch(0)))
    assert h[0].dtype == torch.float16 and (h[0].float() - g[0]).abs().max() < 0.02


@gpu
def test_gpu_nvjpeg_views_match_cpu_views_on_jpegs(tmp_path: Path) -> None:
    """The real input path: camera-like JPEGs decoded by nvJPEG ("mixed") against DALI's CPU
    decoder, same per-sample draws. JPEG decoders may differ by an IDCT rounding step."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(8):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(small).resize((160, 120), Image.BILINEAR).save(path, quality=90)
        samples.append((str(path), 0))
    index = index_of(samples, tmp_path)
    specs = byol_views(64, 0.2)
    cpu = next(iter(D.DaliPretrainLoader(samples, specs, 8, index, options=CPU).epoch(0)))
    opts = R.DaliOptions(threads=2, gpu=True, device_id=torch.cuda.current_device())
    g = next(iter(D.DaliPretrainLoader(samples, specs, 8, index, options=opts).epoch(0)))
    for a, b in zip(cpu, g, strict=True):
        assert b.is_cuda and b.shape == a.shape
        assert (a - b.cpu()).abs().mean() < 0.05


def test_gpu_probe_reports_why_dali_cannot_decode_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: see test_gpu_probe_passes_on_a_working_gpu")
    problem = R.dali_gpu_problem(0)
    assert problem and "\n" not in problem


@gpu
def test_gpu_probe_passes_on_a_working_gpu() -> None:
    assert R.dali_gpu_problem(torch.cuda.current_device()) is None
