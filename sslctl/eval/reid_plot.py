"""CMC curve as a PNG, drawn with PIL (no plotting dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sslctl import checkpoint

_W, _H = 720, 480
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 30, 50, 60  # margins around the plot area
_BLUE = (31, 119, 180)
_GRID = (225, 225, 225)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _x_ticks(n: int) -> list[int]:
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500) if n / s <= 10)
    return sorted({1, *range(step, n + 1, step)})


def render_cmc(cmc_percent: Sequence[float], title: str) -> Image.Image:
    """CMC curve (rank 1…len(cmc) on x, matching rate in % on y) with rank-1/5/10 marked."""
    img = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP  # y0 is the bottom edge
    n = len(cmc_percent)

    def to_xy(rank: int, value: float) -> tuple[float, float]:
        fx = 0.5 if n == 1 else (rank - 1) / (n - 1)
        return x0 + fx * (x1 - x0), y0 - value / 100.0 * (y0 - y1)

    for v in range(0, 101, 20):
        _, y = to_xy(1, v)
        draw.line([(x0, y), (x1, y)], fill=_GRID)
        draw.text((x0 - 8, y), f"{v}", fill="black", font=small, anchor="rm")
    for r in _x_ticks(n):
        x, _ = to_xy(r, 0)
        draw.line([(x, y0), (x, y0 + 5)], fill="black")
        draw.text((x, y0 + 8), str(r), fill="black", font=small, anchor="mt")
    draw.rectangle([x0, y1, x1, y0], outline="black")
    points = [to_xy(r + 1, v) for r, v in enumerate(cmc_percent)]
    if len(points) > 1:
        draw.line(points, fill=_BLUE, width=3)
    for k in (1, 5, 10):
        if k <= n:
            x, y = to_xy(k, cmc_percent[k - 1])
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=_BLUE)
            draw.text((x + 6, y + 4), f"R{k} {cmc_percent[k - 1]:.1f}", fill="black", font=small)
    draw.text((_W / 2, 18), title, fill="black", font=font, anchor="mm")
    draw.text(((x0 + x1) / 2, _H - 18), "rank", fill="black", font=font, anchor="mm")
    draw.text((14, (y0 + y1) / 2), "%", fill="black", font=font, anchor="mm")
    return img


def save_cmc_plot(path: Path, cmc_percent: Sequence[float], title: str) -> None:
    img = render_cmc(cmc_percent, title)
    checkpoint.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
