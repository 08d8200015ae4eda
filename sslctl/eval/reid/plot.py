"""CMC curve as a PNG, drawn with PIL (no plotting dependency).

The curve is a step function ("steps-post", as matplotlib draws it): CMC(k) is a rate over
whole ranks, constant from rank k to rank k + 1, so a straight line between ranks would invent
values in between. The title carries rank-1 and mAP; the x axis can be logarithmic, which
spreads the first ranks (where the curve moves) when max_rank is large.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from sslctl import files

_W, _H = 720, 480
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 30, 50, 60  # margins around the plot area
_BLUE = (31, 119, 180)
_GRID = (225, 225, 225)
DRAWSTYLE = "steps-post"


@dataclass(frozen=True)
class CmcPlot:
    """What was drawn, also stored in the PNG's text chunks (Title, xscale, drawstyle)."""

    path: Path | None
    title: str
    xscale: str  # linear | log
    drawstyle: str


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def cmc_title(label: str, cmc_percent: Sequence[float], m_ap: float) -> str:
    """'<label>: rank-1 R %, mAP M %' (rank-1 is the curve's first point)."""
    return f"{label}: rank-1 {cmc_percent[0]:.2f}%, mAP {m_ap:.2f}%"


def x_fraction(rank: float, n: int, log_x: bool = False) -> float:
    """Position of ``rank`` (1…n) along the x axis, in [0, 1]."""
    if n <= 1:
        return 0.5
    if log_x:
        return math.log(rank) / math.log(n)
    return (rank - 1) / (n - 1)


def step_points(cmc_percent: Sequence[float]) -> list[tuple[int, float]]:
    """(rank, value) vertices of the steps-post curve: each value holds until the next rank."""
    points: list[tuple[int, float]] = []
    for r, v in enumerate(cmc_percent, start=1):
        if points:
            points.append((r, points[-1][1]))  # horizontal run at the previous value
        points.append((r, v))
    return points


def _x_ticks(n: int, log_x: bool) -> list[int]:
    if log_x:
        decades = (10**e * m for e in range(7) for m in (1, 2, 5))
        return sorted({t for t in decades if t <= n} | {n})
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if n / s <= 10)
    return sorted({1, *range(step, n + 1, step)})


def render_cmc(cmc_percent: Sequence[float], title: str, *, log_x: bool = False) -> Image.Image:
    """CMC step curve (rank 1…len(cmc) on x, matching rate in % on y) with rank-1/5/10 marked."""
    img = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP  # y0 is the bottom edge
    n = len(cmc_percent)

    def to_xy(rank: float, value: float) -> tuple[float, float]:
        return x0 + x_fraction(rank, n, log_x) * (x1 - x0), y0 - value / 100.0 * (y0 - y1)

    for v in range(0, 101, 20):
        _, y = to_xy(1, v)
        draw.line([(x0, y), (x1, y)], fill=_GRID)
        draw.text((x0 - 8, y), f"{v}", fill="black", font=small, anchor="rm")
    for r in _x_ticks(n, log_x):
        x, _ = to_xy(r, 0)
        draw.line([(x, y0), (x, y0 + 5)], fill="black")
        draw.text((x, y0 + 8), str(r), fill="black", font=small, anchor="mt")
    draw.rectangle([x0, y1, x1, y0], outline="black")
    points = [to_xy(r, v) for r, v in step_points(cmc_percent)]
    if len(points) > 1:
        draw.line(points, fill=_BLUE, width=3)
    for k in (1, 5, 10):
        if k <= n:
            x, y = to_xy(k, cmc_percent[k - 1])
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=_BLUE)
            draw.text((x + 6, y + 4), f"R{k} {cmc_percent[k - 1]:.1f}", fill="black", font=small)
    draw.text((_W / 2, 18), title, fill="black", font=font, anchor="mm")
    axis = "rank (log scale)" if log_x else "rank"
    draw.text(((x0 + x1) / 2, _H - 18), axis, fill="black", font=font, anchor="mm")
    draw.text((14, (y0 + y1) / 2), "%", fill="black", font=font, anchor="mm")
    return img


def save_cmc_plot(
    path: Path, cmc_percent: Sequence[float], label: str, *, m_ap: float, log_x: bool = False
) -> CmcPlot:
    """Write the CMC step plot atomically; the title is ``cmc_title(label, cmc, m_ap)``."""
    plot = CmcPlot(
        path, cmc_title(label, cmc_percent, m_ap), "log" if log_x else "linear", DRAWSTYLE
    )
    img = render_cmc(cmc_percent, plot.title, log_x=log_x)
    info = PngInfo()
    for key, value in (("Title", plot.title), ("xscale", plot.xscale), ("drawstyle", DRAWSTYLE)):
        info.add_text(key, value)
    files.atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info))
    return plot
