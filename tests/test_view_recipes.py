"""View recipes as data (``data.views: byol | simclr | mocov2``): the papers' values, the draws,
and the same views from the torchvision and DALI (CPU) backends.

The DALI checks use the tolerances tests/test_dali.py uses for the BYOL pair. The one rendering
difference both backends keep on purpose is the order of the four jitter adjustments (random in
torchvision, brightness → contrast → saturation → hue in DALI); the pixel-for-pixel checks with
jitter on therefore give torchvision DALI's order, through the shared parameter draws.
"""

from __future__ import annotations

import random
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslctl import UserError, config
from sslctl.data import dali as D
from sslctl.data import dali_graph as G
from sslctl.data import tv
from sslctl.data.draws import ViewParams, draw_params, sample_rng
from sslctl.data.select import build_pretrain_loader
from sslctl.data.tv import PretrainLoader
from sslctl.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIEW_RECIPES,
    ViewSpec,
    byol_views,
    mocov2_views,
    simclr_views,
    view_pair,
)
from sslctl.dist import DistInfo
from tests.dali_helpers import render_both, uint8_views
from tests.image_helpers import blocks

CPU_RANK = DistInfo(0, 1, 0, torch.device("cpu"))

# ----------------------------------------------------------------------------- the papers

# Written out from the papers, not from sslctl: every ViewSpec field but size, mean and std.
GEOMETRY = {"ratio": (3 / 4, 4 / 3), "flip_p": 0.5, "blur_sigma": (0.1, 2.0)}


def jitter(brightness: float, contrast: float, saturation: float, hue: float) -> dict:
    """The four ColorJitter strengths, in torchvision's order."""
    return {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}


# SimCLR (Chen et al. 2020, appendix A): crop 0.08-1 (bicubic, as its TF code), flip, colour
# jitter of strength 1 (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale p 0.2, blur p 0.5; symmetric.
SIMCLR = {
    **GEOMETRY,
    "scale": (0.08, 1.0),
    "interpolation": "bicubic",
    "jitter_p": 0.8,
    **jitter(0.8, 0.8, 0.8, 0.2),
    "gray_p": 0.2,
    "blur_p": 0.5,
    "solarize_p": 0.0,
    "solarize_threshold": 128,
}
# MoCo v2 ("aug_plus" of main_moco.py): RandomResizedCrop(scale=(0.2, 1)) (torchvision's bilinear),
# ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, blur p 0.5, flip; symmetric.
MOCOV2 = {
    **SIMCLR,
    "scale": (0.2, 1.0),
    "interpolation": "bilinear",
    **jitter(0.4, 0.4, 0.4, 0.1),
}
# BYOL (Grill et al. 2020, table 6): jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; view 1
# always blurred, never solarised; view 2 blurred with p 0.1, solarised with p 0.2.
BYOL_COMMON = {**SIMCLR, **jitter(0.4, 0.4, 0.2, 0.1)}
PAPERS = {
    "byol": (
        {**BYOL_COMMON, "blur_p": 1.0, "solarize_p": 0.0},
        {**BYOL_COMMON, "blur_p": 0.1, "solarize_p": 0.2},
    ),
    "simclr": (SIMCLR, SIMCLR),
    "mocov2": (MOCOV2, MOCOV2),
}
RECIPES = {"simclr": simclr_views, "mocov2": mocov2_views}


def test_the_table_names_every_spec_field() -> None:
    """So that a field added to ViewSpec cannot escape the comparison with the papers."""
    named = {f.name for f in fields(ViewSpec)} - {"size", "mean", "std"}
    for pair in PAPERS.values():
        assert all(set(view) == named for view in pair)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_recipes_are_the_papers(name: str) -> None:
    paper = PAPERS[name]
    default_min = paper[0]["scale"][0]
    for size in (224, 32):
        specs = view_pair(name, size, default_min)
        assert specs == VIEW_RECIPES[name](size, default_min)
        for spec, want in zip(specs, paper, strict=True):
            assert spec.size == size
            assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
            for key, value in want.items():
                got = getattr(spec, key)
                assert got == (value if isinstance(value, str) else pytest.approx(value)), key
    # each recipe's own default crop scale is its paper's
    assert all(s.scale == (default_min, 1.0) for s in VIEW_RECIPES[name]())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_simclr_and_mocov2_views_are_symmetric(name: str) -> None:
    v1, v2 = RECIPES[name](224)
    assert v1 == v2
    w1, w2 = view_pair(name, 48, 0.3)
    assert w1 == w2 and w1.scale == (0.3, 1.0) and w1.size == 48
    b1, b2 = byol_views()
    assert b1 != b2  # BYOL's pair is not


def test_view_pair_for_each_data_views_value() -> None:
    assert set(config.CHOICES["data.views"]) == set(VIEW_RECIPES) == {"byol", "simclr", "mocov2"}
    for name in config.CHOICES["data.views"]:
        specs = view_pair(name, 40, 0.25)
        assert specs == VIEW_RECIPES[name](40, 0.25)
        assert all(s.size == 40 and s.scale == (0.25, 1.0) for s in specs)
        cfg = config.load("demo-cpu", [f"data.views={name}"])
        assert cfg.data.views == name
    assert view_pair("byol", 224, 0.08) == byol_views()
    assert view_pair("simclr", 224, 0.08) == simclr_views()
    assert view_pair("mocov2", 224, 0.2) == mocov2_views()
    with pytest.raises(KeyError):
        view_pair("dino", 224, 0.08)
    with pytest.raises(UserError, match="data.views"):
        config.load("demo-cpu", ["data.views=dino"])


def test_byol_pair_stays_the_default_of_triplet_and_byol() -> None:
    assert config.DataCfg().views == "byol"
    profiles = sorted(config.PROFILE_DIR.glob("*.yaml"))
    seen = 0
    for path in profiles:
        cfg = config.load_any(str(path))
        if isinstance(cfg, config.Config) and cfg.method.name in ("triplet", "byol"):
            assert cfg.data.views == "byol", path.name
            seen += 1
    assert seen >= 2


# ----------------------------------------------------------------------------- the draws


def _draws(specs: tuple[ViewSpec, ViewSpec], n: int) -> tuple[list[ViewParams], ...]:
    """Both views' draws for n samples of a 500×375 image, as both loaders draw them."""
    views: tuple[list[ViewParams], list[ViewParams]] = ([], [])
    for i in range(n):
        rng = sample_rng(0, 0, i)
        for k, spec in enumerate(specs):
            views[k].append(draw_params(500, 375, spec, rng))
    return views


def _rate(flags: list[bool], p: float, tol: float) -> None:
    rate = float(np.mean(flags))
    if p in (0.0, 1.0):
        assert rate == p  # never / always, not "about"
    else:
        assert abs(rate - p) <= tol, (rate, p)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_draws_follow_the_recipe(name: str) -> None:
    """1000 samples (binomial σ ≤ 0.016): every coin at its paper's rate, every factor inside
    and spanning its paper's range, crops from the paper's smallest area up."""
    specs = view_pair(name, 224, PAPERS[name][0]["scale"][0])
    for params, paper in zip(_draws(specs, 1000), PAPERS[name], strict=True):
        _rate([p.flip for p in params], paper["flip_p"], 0.05)
        _rate([p.jitter is not None for p in params], paper["jitter_p"], 0.04)
        _rate([p.gray for p in params], paper["gray_p"], 0.04)
        _rate([p.blur_sigma is not None for p in params], paper["blur_p"], 0.05)
        _rate([p.solarize for p in params], paper["solarize_p"], 0.04)
        jit = np.array([p.jitter[1:] for p in params if p.jitter is not None])
        for k, key in enumerate(("brightness", "contrast", "saturation")):
            lo, hi = 1.0 - paper[key], 1.0 + paper[key]
            assert lo <= jit[:, k].min() < lo + 0.05 and hi - 0.05 < jit[:, k].max() <= hi, key
        hue = np.abs(jit[:, 3])
        assert hue.max() <= paper["hue"] and hue.max() > 0.95 * paper["hue"]
        orders = {p.jitter[0] for p in params if p.jitter is not None}
        assert len(orders) == 24  # torchvision's random order of the four adjustments
        sig = np.array([p.blur_sigma for p in params if p.blur_sigma is not None])
        assert 0.1 <= sig.min() < 0.2 and 1.9 < sig.max() <= 2.0
        area = np.array([(p.box[2] - p.box[0]) * (p.box[3] - p.box[1]) for p in params])
        area = area / (500 * 375)
        lo = paper["scale"][0]
        assert 0.97 * lo <= area.min() < lo + 0.02 and area.max() <= 1.0


def test_simclr_views_gray_a_fifth_never_solarise_and_blur_half() -> None:
    """The brief's example, over a few hundred samples: SimCLR's views against BYOL's."""
    s1, s2 = _draws(simclr_views(224), 400)
    b1, b2 = _draws(byol_views(224), 400)
    for views in (s1, s2):
        assert 0.15 <= np.mean([p.gray for p in views]) <= 0.25
        assert not any(p.solarize for p in views)
        assert 0.42 <= np.mean([p.blur_sigma is not None for p in views]) <= 0.58
    assert all(p.blur_sigma is not None for p in b1) and not any(p.solarize for p in b1)
    assert 0.15 <= np.mean([p.solarize for p in b2]) <= 0.25


# ----------------------------------------------------------------------------- DALI vs torchvision


@pytest.fixture
def dali(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DALI installed (else skip), and its preflight index cached under tmp_path."""
    pytest.importorskip("nvidia.dali")
    monkeypatch.setenv("SSLCTL_CACHE", str(tmp_path / "cache"))


def _fixed_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both backends draw as before, but torchvision applies the jitter in DALI's order."""
    real = tv.draw_params

    def drawn(width: int, height: int, spec: ViewSpec, rng: random.Random) -> ViewParams:
        p = real(width, height, spec, rng)
        if p.jitter is None:
            return p
        return replace(p, jitter=((0, 1, 2, 3), *p.jitter[1:]))

    monkeypatch.setattr(tv, "draw_params", drawn)  # TwoViewTransform's
    monkeypatch.setattr(D, "draw_params", drawn)  # DaliPretrainLoader's


def _assert_same_pixels(d: list[np.ndarray], t: list[np.ndarray], worst: float = 8.0) -> None:
    """test_dali.py's bound for BYOL's views without jitter (mean < 3, median sample < 2
    levels of 255), and no single sample off by more than ``worst`` levels on average."""
    for k in range(2):
        per_sample = np.abs(d[k] - t[k]).mean(axis=(1, 2, 3))
        assert per_sample.mean() < 3.0, k
        assert np.median(per_sample) < 2.0, k
        assert per_sample.max() < worst, (k, per_sample.max())


@pytest.mark.dali
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_views_without_jitter_match_pixel_for_pixel(dali: None, tmp_path: Path, name: str) -> None:
    """Crop (MoCo v2's bilinear, SimCLR's bicubic), flip, grayscale and blur."""
    img = blocks(tmp_path / "c.png", size=48)
    specs = tuple(replace(s, jitter_p=0.0) for s in view_pair(name, 32, 0.2))
    d, t = render_both(img, 32, specs)  # type: ignore[arg-type]
    _assert_same_pixels(d, t, worst=4.0)


@pytest.mark.dali
@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_simclr_full_jitter_matches_pixel_for_pixel(
    dali: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blur: float
) -> None:
    """SimCLR's four adjustments at strength 1 (hue ±72°, factors up to 1.8) on every view
    (jitter_p 1), blurred or not, grayed at the recipe's rate or always: the same image from
    the same draws within a few levels (DALI renders hue > 0.1 turn with PIL's HSV arithmetic;
    its YIQ rotation was 10-20 levels off here, and graying before that hue shift up to 30)."""
    _fixed_order(monkeypatch)
    img = blocks(tmp_path / "c.png", size=48)
    for gray in (0.2, 1.0):
        specs = tuple(replace(s, jitter_p=1.0, blur_p=blur, gray_p=gray) for s in simclr_views(32))
        d, t = render_both(img, 32, specs)  # type: ignore[arg-type]
        _assert_same_pixels(d, t)


@pytest.mark.dali
@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_mocov2_jitter_without_hue_matches_pixel_for_pixel(
    dali: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blur: float
) -> None:
    """MoCo v2's ±0.1-turn hue stays DALI's YIQ rotation (as BYOL's; compared by its mean
    shift below); brightness, contrast and saturation 0.4 and graying match pixel for pixel."""
    _fixed_order(monkeypatch)
    img = blocks(tmp_path / "c.png", size=48)
    specs = tuple(replace(s, jitter_p=1.0, blur_p=blur, hue=0.0) for s in mocov2_views(32))
    d, t = render_both(img, 32, specs)  # type: ignore[arg-type]
    _assert_same_pixels(d, t)


def _hue(v: np.ndarray) -> np.ndarray:
    """HSV hue in turns of every pixel of …×3 (colorsys.rgb_to_hsv's, vectorised)."""
    x = np.clip(v / 255.0, 0.0, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hi, lo = x.max(-1), x.min(-1)
    c = np.where(hi > lo, hi - lo, 1.0)
    rc, gc, bc = (hi - r) / c, (hi - g) / c, (hi - b) / c
    h = np.where(r == hi, bc - gc, np.where(g == hi, 2.0 + rc - bc, 4.0 + gc - rc))
    return np.where(hi > lo, (h / 6.0) % 1.0, 0.0)


def _chroma(a: np.ndarray) -> np.ndarray:
    return (a.max(-1) - a.min(-1)).mean(axis=(-1, -2))


@pytest.mark.dali
@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_each_adjustment_at_the_recipes_strength(
    dali: None, tmp_path: Path, name: str, blur: float
) -> None:
    """Each adjustment alone at the recipe's strength, jitter_p 1, blurred (σ 0.1-2) or not:
    per-sample factors measured from the pixels agree within test_dali.py's BYOL tolerances
    (brightness 0.02, contrast and saturation 0.03, mean hue shift 8°)."""
    spec = view_pair(name, 32, 0.2)[0]
    img = blocks(tmp_path / "c.png", lo=50, hi=170)
    src = np.asarray(Image.open(img), np.float32)
    base = replace(
        spec,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=1.0,
        gray_p=0.0,
        blur_p=blur,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.0,
    )
    checks = {
        "brightness": (lambda a: a.mean(axis=(1, 2, 3)) / src.mean(), 0.02),
        "contrast": (lambda a: a.std(axis=(1, 2, 3)) / src.std(), 0.03),
        "saturation": (lambda a: _chroma(a) / _chroma(src), 0.03),
    }
    alone = {key: replace(base, **{key: getattr(spec, key)}) for key in (*checks, "hue")}
    # one adjustment per view: (brightness, contrast), then (saturation, hue)
    d1, t1 = render_both(img, 48, (alone["brightness"], alone["contrast"]))
    d2, t2 = render_both(img, 48, (alone["saturation"], alone["hue"]))
    rendered = {"brightness": (d1[0], t1[0]), "contrast": (d1[1], t1[1])}
    rendered["saturation"] = (d2[0], t2[0])
    for key, (measure, tol) in checks.items():
        md, mt = (measure(v) for v in rendered[key])
        assert np.abs(md - mt).max() < tol, key
        if blur == 0.0:  # the factor's whole range shows (bright ends clip at 255)
            lo, hi = 1.0 - getattr(spec, key), 1.0 + getattr(spec, key)
            assert lo - 0.02 <= md.min() < lo + 0.12, key
            assert hi - 0.12 < md.max() <= hi + 0.02, key
    d, t = [d2[1]], [t2[1]]
    h0 = _hue(src)

    def shift(v: np.ndarray) -> np.ndarray:  # mean circular hue shift, degrees
        return np.degrees(np.angle(np.exp(2j * np.pi * (_hue(v) - h0)).mean(axis=(1, 2))))

    sd, st = shift(d[0]), shift(t[0])
    degrees = spec.hue * 360.0
    assert np.abs(sd - st).max() < 8.0
    assert np.abs(st).max() <= degrees + 0.5 and np.abs(st).max() > 0.8 * degrees
    assert np.abs(sd).max() <= degrees * 7 / 6
    assert np.corrcoef(sd, st)[0, 1] > 0.95
    if name == "simclr":  # PIL's own HSV arithmetic in DALI: the same pixels
        assert np.abs(d[0] - t[0]).mean() < (0.1 if blur == 0.0 else 1.0)


@pytest.mark.dali
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_normalised_output_statistics_match(dali: None, tmp_path: Path, name: str) -> None:
    """The recipe as it is (random jitter order in torchvision) on saturated images, two
    seeds: per-channel batch mean and std within test_dali.py's BYOL tolerances (0.1, 0.06 in
    normalised units). DALI's YIQ hue missed the std one at SimCLR's ±72° (0.07)."""
    specs = view_pair(name, 32, 0.2)
    for seed in (1, 2):
        img = blocks(tmp_path / str(seed) / "c.png", size=48, seed=seed)
        d, t = render_both(img, 64, specs, seed=seed)
        for vd, vt in zip(d, t, strict=True):
            md, mt = vd.mean(axis=(0, 1, 2)), vt.mean(axis=(0, 1, 2))
            sd, st = vd.std(axis=(0, 1, 2)), vt.std(axis=(0, 1, 2))
            scale = 255.0 * np.array(IMAGENET_STD)  # uint8 levels → normalised units
            assert np.abs((md - mt) / scale).max() < 0.1, (seed, md, mt)
            assert np.abs((sd - st) / scale).max() < 0.06, (seed, sd, st)


def test_dali_keeps_byols_hue_and_feeds_simclrs_in_pil_steps() -> None:
    """DALI's fn.hsv (degrees, YIQ) for BYOL's and MoCo v2's ±0.1 turn, unchanged; PIL hue
    steps, exactly torchvision's ``uint8(int32(hue * 255))``, for SimCLR's ±0.2."""
    hue = 6  # index of "hue" in _view_arrays' output
    assert G.VIEW_FIELDS[hue] == "hue"
    for h in (-0.2, -0.1, -0.0039, 0.0, 0.003, 0.05, 0.1999, 0.2):
        assert G.pil_hue_steps(h) == int(np.int32(h * 255).astype(np.uint8))
    params = [
        ViewParams((0, 0, 8, 8), False, ((0, 1, 2, 3), 1.1, 0.9, 1.2, h), g, None, False)
        for h, g in ((0.05, False), (-0.1, True))
    ]
    for spec in (*byol_views(), *mocov2_views()):
        assert not G.uses_pil_hue(spec)
        arrays = G.view_arrays(params, spec)
        assert arrays[hue].tolist() == pytest.approx([18.0, -36.0])
        assert arrays[5].tolist() == pytest.approx([1.2, 0.0])  # gray = zero saturation
    spec = simclr_views()[0]
    assert G.uses_pil_hue(spec)
    arrays = G.view_arrays(params, spec)
    assert arrays[hue].tolist() == [12.0, 231.0]
    assert arrays[5].tolist() == pytest.approx([1.2, 1.2])  # grayed after the hue shift


# ----------------------------------------------------------------------------- the loaders


def _loader_views(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, backend: str, n: int = 64
) -> tuple[object, tuple[ViewSpec, ViewSpec], list[np.ndarray], list[tuple[ViewParams, ...]]]:
    """The loader build_pretrain_loader builds for ``data.views=name`` on this backend, its
    specs, one epoch's views (uint8 scale) and the draws both loaders make for them."""
    monkeypatch.setenv("SSLCTL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    for i in range(n):
        blocks(root / "c" / f"{i:03d}.png", size=40, seed=i)
    scale_min = PAPERS[name][0]["scale"][0]
    sets = [
        f"data.views={name}",
        f"data.backend={backend}",
        "data.image_size=32",
        f"data.crop_scale_min={scale_min}",
        "data.workers=0",
        f"train.batch_size={n}",
    ]
    cfg = config.load("demo-cpu", sets)
    loader = build_pretrain_loader(cfg, root, CPU_RANK)
    if backend == "dali":
        assert isinstance(loader, D.DaliPretrainLoader)
        specs = loader.specs
    else:
        assert isinstance(loader, PretrainLoader)
        specs = loader.dataset.transform.specs  # type: ignore[assignment]
    assert specs == view_pair(name, 32, scale_min)
    (v1, v2), *rest = list(loader.epoch(0))  # type: ignore[attr-defined]
    assert not rest and v1.shape == v2.shape == (n, 3, 32, 32)
    draws = []
    for key in loader.indices(0):  # type: ignore[attr-defined]
        rng = sample_rng(cfg.train.seed, 0, key)
        draws.append(tuple(draw_params(40, 40, s, rng) for s in specs))
    return loader, specs, [uint8_views(v1), uint8_views(v2)], draws


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=pytest.mark.dali)])
def test_loader_renders_the_configured_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """data.views=simclr / mocov2 through build_pretrain_loader: the rendered views are gray
    exactly where the draws say (at about p 0.2), and SimCLR's stronger jitter spreads the
    views' brightness and colourfulness wider than MoCo v2's."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    spread = {}
    for name in ("simclr", "mocov2"):
        _, _, views, draws = _loader_views(tmp_path / name, monkeypatch, name, backend)
        means, chroma = [], []
        for k in range(2):
            gray = np.abs(np.diff(views[k], axis=3)).max(axis=(1, 2, 3)) <= 1.5
            drawn = np.array([d[k].gray for d in draws])
            assert np.array_equal(gray, drawn), (name, k)
            assert 0.08 <= gray.mean() <= 0.35  # p 0.2 over 64 samples (σ 0.05)
            assert not any(d[k].solarize for d in draws)
            blurred = np.mean([d[k].blur_sigma is not None for d in draws])
            assert 0.3 <= blurred <= 0.7  # p 0.5 (σ 0.06)
            colour = ~gray
            means.append(views[k].mean(axis=(1, 2, 3)))
            chroma.append(_chroma(views[k][colour]))
        spread[name] = (np.std(np.concatenate(means)), np.std(np.concatenate(chroma)))
    assert spread["simclr"][0] > 1.3 * spread["mocov2"][0], spread
    assert spread["simclr"][1] > 1.3 * spread["mocov2"][1], spread
