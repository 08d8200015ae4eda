"""View specs (SPEC §1 table), unit conversions, and the torchvision two-view transform."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sslctl.data import views
from sslctl.data.draws import ViewParams, crop_box, draw_params, sample_rng
from sslctl.data.tv import TwoViewTransform, _Normalize, eval_transform, render_view
from tests.image_helpers import unnormalize


def test_byol_views_match_spec_table() -> None:
    v1, v2 = views.byol_views()
    for v in (v1, v2):
        assert v.size == 224 and v.scale == (0.08, 1.0) and v.interpolation == "bicubic"
        assert v.ratio == pytest.approx((3 / 4, 4 / 3))
        assert v.flip_p == 0.5 and v.jitter_p == 0.8 and v.gray_p == 0.2
        assert (v.brightness, v.contrast, v.saturation, v.hue) == (0.4, 0.4, 0.2, 0.1)
        assert v.blur_sigma == (0.1, 2.0) and v.solarize_threshold == 128
        assert v.mean == (0.485, 0.456, 0.406) and v.std == (0.229, 0.224, 0.225)
    assert (v1.blur_p, v1.solarize_p) == (1.0, 0.0)
    assert (v2.blur_p, v2.solarize_p) == (0.1, 0.2)
    small = views.byol_views(size=32, scale_min=0.2)
    assert all(v.size == 32 and v.scale == (0.2, 1.0) for v in small)


def test_specs_are_frozen_and_validated() -> None:
    spec = views.ViewSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.size = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="gray_p"):
        views.ViewSpec(gray_p=1.5)
    with pytest.raises(ValueError, match="scale"):
        views.ViewSpec(scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="hue"):
        views.ViewSpec(hue=36.0)  # degrees by mistake
    with pytest.raises(ValueError, match="crop"):
        views.EvalSpec(crop="middle")


def test_unit_conversions() -> None:
    assert views.hue_degrees(views.ViewSpec(hue=0.1)) == pytest.approx(36.0)
    assert views.blur_kernel_size(2.0) == 13
    assert views.blur_kernel_size(0.1) == 3
    for sigma in (0.1, 0.33, 1.0, 1.7, 2.0, 5.5):
        k = views.blur_kernel_size(sigma)
        assert k % 2 == 1 and (k - 1) / 2 >= 3 * sigma
    with pytest.raises(ValueError):
        views.blur_kernel_size(0.0)


def test_eval_specs() -> None:
    val = views.linear_val()
    assert (val.crop, val.height, val.width, val.resize) == ("center", 224, 224, 256)
    train = views.linear_train()
    assert (train.crop, train.height, train.flip_p) == ("random", 224, 0.5)
    r = views.reid()
    assert (r.crop, r.height, r.width, r.interpolation) == ("none", 256, 128, "bicubic")
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    assert eval_transform(views.linear_val(16, 20))(img).shape == (3, 16, 16)
    assert eval_transform(views.linear_train(16))(img).shape == (3, 16, 16)
    out = eval_transform(views.reid(32, 16))(img)
    assert out.shape == (3, 32, 16)
    assert torch.allclose(
        unnormalize(out), torch.tensor([200, 10, 10]).view(3, 1, 1) / 255, atol=1e-5
    )


def test_crop_box_respects_scale_ratio_and_bounds() -> None:
    spec = views.ViewSpec(scale=(0.08, 1.0))
    rng = random.Random(0)
    areas = []
    for _ in range(2000):
        left, top, right, bottom = crop_box(500, 375, spec, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        areas.append(w * h / (500 * 375))
        assert 0.07 < areas[-1] <= 1.0
        assert 0.7 < w / h < 1.4
    # Area fractions ~ U(0.08, 1) before rejection of crops too big for the image: mean ≈ 0.5.
    assert 0.35 < float(np.mean(areas)) < 0.55
    # A very wide image takes the centred fallback crop with the widest allowed ratio.
    narrow = views.ViewSpec(scale=(1.0, 1.0))
    assert crop_box(400, 100, narrow, random.Random(0)) == (133, 0, 266, 100)


def _colour_images(n: int, size: int = 48) -> list[Image.Image]:
    """Saturated random-colour noise, so that no view becomes gray unless grayscaled."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        small[..., rng.integers(3)] = 0  # each cell misses a primary: far from gray
        out.append(Image.fromarray(small).resize((size, size), Image.Resampling.NEAREST))
    return out


def _uint8(view: torch.Tensor) -> torch.Tensor:
    return torch.round(unnormalize(view) * 255)


def test_two_view_statistics() -> None:
    v1_spec, v2_spec = views.byol_views(size=16)
    tf = TwoViewTransform(v1_spec, v2_spec)
    images = _colour_images(400)
    gray = [0, 0]
    solar2 = 0
    for i, img in enumerate(images):
        rng = sample_rng(0, 0, i)
        p1 = draw_params(img.width, img.height, v1_spec, rng)
        p2 = draw_params(img.width, img.height, v2_spec, rng)
        a, b = tf(img, sample_rng(0, 0, i))
        assert a.shape == b.shape == (3, 16, 16) and a.dtype == b.dtype == torch.float32
        for k, (view, p) in enumerate(((a, p1), (b, p2))):
            u = _uint8(view)
            is_gray = bool((u[0] == u[1]).all() and (u[1] == u[2]).all())
            assert is_gray == p.gray
            gray[k] += is_gray
            if p.solarize:  # solarisation is the last step: no value is left >= the threshold
                assert u.max() < 128
        assert not p1.solarize and p1.blur_sigma is not None
        solar2 += p2.solarize
    assert gray[0] / 400 == pytest.approx(0.2, abs=0.06)
    assert gray[1] / 400 == pytest.approx(0.2, abs=0.06)
    assert solar2 / 400 == pytest.approx(0.2, abs=0.06)


def test_param_draws_follow_probabilities() -> None:
    v1_spec, v2_spec = views.byol_views()
    rng = random.Random(1)
    draws = [
        (draw_params(64, 48, v1_spec, rng), draw_params(64, 48, v2_spec, rng)) for _ in range(3000)
    ]
    p1s, p2s = [d[0] for d in draws], [d[1] for d in draws]
    assert np.mean([p.flip for p in p1s]) == pytest.approx(0.5, abs=0.04)
    assert np.mean([p.jitter is not None for p in p2s]) == pytest.approx(0.8, abs=0.03)
    assert all(p.blur_sigma is not None and 0.1 <= p.blur_sigma <= 2.0 for p in p1s)
    assert np.mean([p.blur_sigma is not None for p in p2s]) == pytest.approx(0.1, abs=0.02)
    assert not any(p.solarize for p in p1s)
    jit = [p.jitter for p in p1s if p.jitter is not None]
    assert all(0.6 <= j[1] <= 1.4 and 0.8 <= j[3] <= 1.2 and -0.1 <= j[4] <= 0.1 for j in jit)
    assert len({j[0] for j in jit}) == 24  # every order of the four adjustments occurs


def test_transform_is_render_of_drawn_params_and_reproducible() -> None:
    v1_spec, v2_spec = views.byol_views(size=24)
    tf = TwoViewTransform(v1_spec, v2_spec)
    img = _colour_images(1, 64)[0]
    a, b = tf(img, sample_rng(3, 1, 7))
    rng = sample_rng(3, 1, 7)
    p1 = draw_params(64, 64, v1_spec, rng)
    p2 = draw_params(64, 64, v2_spec, rng)
    norm = _Normalize(v1_spec.mean, v1_spec.std)
    assert torch.equal(a, norm(render_view(img, v1_spec, p1)))
    assert torch.equal(b, norm(render_view(img, v2_spec, p2)))
    again = tf(img, sample_rng(3, 1, 7))
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])
    other = tf(img, sample_rng(3, 2, 7))  # next epoch: new views
    assert not torch.equal(a, other[0])


def test_normalize_matches_torchvision() -> None:
    import torchvision.transforms.functional as F

    img = _colour_images(1, 20)[0]
    ours = _Normalize(views.IMAGENET_MEAN, views.IMAGENET_STD)(img)
    ref = F.normalize(F.to_tensor(img), views.IMAGENET_MEAN, views.IMAGENET_STD)
    assert ours.is_contiguous() and torch.allclose(ours, ref, atol=1e-5)


def test_solarize_gray_and_flip_pixel_semantics() -> None:
    spec = views.ViewSpec(size=2, interpolation="nearest")
    img = Image.fromarray(np.array([[[10, 127, 128], [200, 255, 0]]] * 2, dtype=np.uint8))

    def render(flip: bool = False, gray: bool = False, solarize: bool = False) -> np.ndarray:
        params = ViewParams((0, 0, 2, 2), flip, None, gray, None, solarize)
        return np.asarray(render_view(img, spec, params))

    solar = render(solarize=True)  # values >= 128 are inverted, 127 is kept
    assert solar[0, 0].tolist() == [10, 127, 127] and solar[0, 1].tolist() == [55, 0, 0]
    gray = render(gray=True)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert gray[0, 0, 0] == round(0.299 * 10 + 0.587 * 127 + 0.114 * 128)
    assert render(flip=True)[0, 0].tolist() == [200, 255, 0]
