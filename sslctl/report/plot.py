"""report.png: the curves of one or several runs on a grid of panels (matplotlib, optional).

Panels over optimizer steps (the top axis in epochs when every run has the same steps per
epoch): loss; lr and target momentum; the method's own statistics (every numeric key no other
panel draws: Triplet's d_ap/d_an, SimCLR's pos_sim …); feat_std beside 1/√d, the value of
L2-normalised features spread evenly over d dimensions, and 0, the value of collapse; the kNN
monitor's top-1; throughput. One colour per run, the same in every panel. Drawn on matplotlib's
Agg canvas without pyplot (no display, no global figure state).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sslctl.report.runs import (
    BOOKKEEPING,
    FIXED_PANELS,
    KNN_KEY,
    Run,
    number,
    steps_per_epoch,
)

FIG_W_IN, FIG_H_IN, DPI = 15.0, 8.6, 100  # report.png is 1500 × 860 pixels
COLOURS = (  # matplotlib's tab10, fixed here so that a run's colour can be named in tests
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
STYLES = ("-", "--", ":", "-.")
# What a method's statistic measures, for the legend (keys not listed are shown as they are).
STAT_LABELS = {
    "d_ap": "d_ap: anchor–positive distance (‖p̂−ẑ‖² − 2)",
    "d_an": "d_an: anchor–negative distance (kept negatives)",
    "pos_sim": "pos_sim: positive-pair cosine",
}
MISSING = "report.png needs matplotlib: pip install 'sslctl[plot]' (or: pip install matplotlib)"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``; non-finite values stay as NaN: gaps in the line."""
    xs, ys = [], []
    for r in records:
        step, v = number(r.get("step")), number(r.get(key))
        if step is not None and v is not None:
            xs.append(step)
            ys.append(v)
    return xs, ys


def _finite(ys: list[float]) -> list[float]:
    return [y for y in ys if math.isfinite(y)]


def _empty(ax: Any, text: str) -> None:
    """A panel without data: the reason in its middle, no axes ticks that would mean nothing."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.45")
    ax.set_xticks([])
    ax.set_yticks([])


def method_keys(runs: list[Run]) -> list[str]:
    """The method's own statistics: numeric keys of the training records no other panel draws."""
    keys: dict[str, None] = {}
    for run in runs:
        for r in run.train:
            for k, v in r.items():
                if k in BOOKKEEPING or k in FIXED_PANELS or k.startswith("knn_"):
                    continue
                if number(v) is not None:
                    keys.setdefault(k)
    return sorted(keys)


def _method(run: Run) -> Any:
    m = run.config.get("method")
    return m.get("name") if isinstance(m, dict) else None


def _scaled(ys: list[float]) -> list[float]:
    """``ys`` mapped to [0, 1] by their own finite min and max (non-finite values stay so)."""
    fin = _finite(ys)
    lo, hi = (min(fin), max(fin)) if fin else (0.0, 1.0)
    return [(y - lo) / (hi - lo) if hi > lo else 0.0 * y for y in ys]


def _panel_loss(ax: Any, runs: list[Run], colours: list[str]) -> bool:
    # Different methods' losses differ in scale and sign (Triplet's hinge sits near its margin of
    # 100, SimSiam's negative cosine in [-1, 0]): side by side, each run is scaled to its own range.
    scaled = len({_method(r) for r in runs}) > 1
    seen: list[float] = []
    for run, c in zip(runs, colours, strict=True):
        xs, ys = _series(run.train, "loss")
        ys = _scaled(ys) if scaled else ys
        ax.plot(xs, ys, color=c, lw=1.4)
        seen += _finite(ys)
    if scaled:
        ax.set_title("training loss, each run scaled to [0, 1]")
        ax.set_ylabel("(loss − min) / (max − min), per run")
    else:
        ax.set_title("training loss (mean over each logging window)")
        ax.set_ylabel("loss")
    # Log scale when the curves span decades.
    if not scaled and seen and min(seen) > 0 and max(seen) / min(seen) >= 30:
        ax.set_yscale("log")
    if not seen:
        _empty(ax, "no training records yet")
    return bool(seen)


def _panel_schedule(ax: Any, runs: list[Run], colours: list[str]) -> bool:
    right = None
    any_lr = False
    for run, c in zip(runs, colours, strict=True):
        xs, ys = _series(run.train, "lr")
        ax.plot(xs, ys, color=c, lw=1.4)
        any_lr |= bool(_finite(ys))
        mx, my = _series(run.train, "momentum")
        if _finite(my):
            right = right or ax.twinx()
            right.plot(mx, my, color=c, lw=1.4, ls="--")
    from matplotlib.ticker import FormatStrFormatter

    ax.set_title(
        "lr (solid, left) · target momentum τ (dashed, right)" if right else "learning rate"
    )
    ax.set_ylabel("learning rate")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))  # no "1e-3" offset over the title
    if right is not None:
        right.set_ylabel("target momentum τ")
        right.ticklabel_format(axis="y", useOffset=False)
    if not any_lr:
        _empty(ax, "no lr in the records")
    return any_lr


def _panel_method(ax: Any, runs: list[Run], colours: list[str]) -> bool:
    keys = method_keys(runs)
    if not keys:
        _empty(ax, "this method logs no statistics of its own")
        ax.set_title("method statistics")
        return False
    from matplotlib.lines import Line2D

    for run, c in zip(runs, colours, strict=True):
        for i, k in enumerate(keys):
            xs, ys = _series(run.train, k)
            ax.plot(xs, ys, color=c, lw=1.4, ls=STYLES[i % len(STYLES)])
    handles = [
        Line2D([], [], color="0.25", ls=STYLES[i % len(STYLES)], label=STAT_LABELS.get(k, k))
        for i, k in enumerate(keys)
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_title("method statistics: " + ", ".join(keys))
    return True


def _proj_dim(run: Run) -> int | None:
    model = run.config.get("model")
    d = number(model.get("proj_dim")) if isinstance(model, dict) else None
    return int(d) if d and d > 0 else None


def _panel_feat_std(ax: Any, runs: list[Run], colours: list[str]) -> bool:
    top, drawn = 0.0, False
    for run, c in zip(runs, colours, strict=True):
        xs, ys = _series(run.train, "feat_std")
        ax.plot(xs, ys, color=c, lw=1.4)
        top = max([top, *_finite(ys)])
        drawn |= bool(_finite(ys))
    for d in sorted({d for run in runs if (d := _proj_dim(run))}):
        ref = 1 / math.sqrt(d)
        ax.axhline(ref, color="0.35", ls=":", lw=1.2, label=f"1/√d = {ref:.3f} (healthy, d = {d})")
        top = max(top, ref)
    ax.axhline(0.0, color="black", ls="--", lw=1.0, label="0 = collapse")  # no run's colour
    ax.set_ylim(-0.05 * (top or 1), 1.2 * (top or 1))
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("feat_std: per-dimension std of L2-normalised projections")
    ax.set_ylabel("std")
    if not drawn:
        _empty(ax, "no feat_std in the records")
    return drawn


def _lines(
    ax: Any, runs: list[Run], colours: list[str], key: str, knn: bool = False, **style: Any
) -> bool:
    """One line per run of ``key`` (from the kNN records when ``knn``); whether any is finite."""
    drawn = False
    for run, c in zip(runs, colours, strict=True):
        xs, ys = _series(run.knn if knn else run.train, key)
        ax.plot(xs, ys, color=c, lw=1.4, **style)
        drawn |= bool(_finite(ys))
    return drawn


def _panel_knn(ax: Any, runs: list[Run], colours: list[str]) -> bool:
    drawn = _lines(ax, runs, colours, KNN_KEY, knn=True, marker="o", ms=4)
    ax.set_title("kNN monitor: top-1 on the held-out set")
    ax.set_ylabel("top-1 %")
    if not drawn:
        _empty(ax, "no kNN monitor records\n(eval.knn_every = 0, or not reached yet)")
    return drawn


def _panel_throughput(ax: Any, runs: list[Run], colours: list[str]) -> bool:
    drawn = _lines(ax, runs, colours, "img_s")
    ax.set_title("throughput (all processes)")
    ax.set_ylabel("images / s")
    ax.set_ylim(
        0, 1.1 * max([1.0, *(y for r in runs for y in _finite(_series(r.train, "img_s")[1]))])
    )
    if not drawn:
        _empty(ax, "no img_s in the records")
    return drawn


PANELS: tuple[tuple[str, Callable[[Any, list[Run], list[str]], bool]], ...] = (
    ("loss", _panel_loss),
    ("schedule", _panel_schedule),
    ("method", _panel_method),
    ("feat_std", _panel_feat_std),
    ("knn", _panel_knn),
    ("throughput", _panel_throughput),
)


def common_steps_per_epoch(runs: list[Run]) -> float | None:
    """Steps per epoch shared by every run (within 1 %), for the epoch axis; else None."""
    found = [s for s in (steps_per_epoch(r) for r in runs) if s]
    if not found or len(found) != len(runs) or max(found) > 1.01 * min(found):
        return None
    return sum(found) / len(found)


def _epoch_axis(ax: Any, spe: float | None, has_data: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color="0.9", lw=0.8)
    if ax.get_yscale() == "linear":
        # whole values on the ticks (200.24, not 0.04 with "+2.002e2" printed over the title)
        with contextlib.suppress(AttributeError):  # a panel with its own tick formatter
            ax.ticklabel_format(axis="y", useOffset=False)
    if spe and has_data:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
        top.set_xlabel("epoch", fontsize=9)
        top.tick_params(labelsize=8)


def _headline(r: dict[str, Any]) -> str:
    """'demo: triplet, convnet4 — step 185/616, epoch 4.2, stopped by signal'."""
    step = f"step {r['step']:.0f}" if r.get("step") is not None else "no step yet"
    if r.get("steps_planned"):
        step += f"/{r['steps_planned']}"
    epoch = f", epoch {r['epoch']:.1f}" if r.get("epoch") is not None else ""
    what = ", ".join(str(x) for x in (r.get("method"), r.get("network")) if x)
    return f"{r['name']}: {what} — {step}{epoch}, {r['status']}"


def draw(runs: list[Run], rows: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """Write report.png to ``path``; returns its size and each panel's pixel box (left, top,
    right, bottom from the image's top-left corner) and whether it has data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(FIG_W_IN, FIG_H_IN), dpi=DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(runs))]
    spe = common_steps_per_epoch(runs)
    has_data = {}
    # one step range in every panel: a kNN point lines up with the loss above it
    last = max(
        (s for r in runs for rec in r.train + r.knn if (s := number(rec.get("step")))), default=0
    )
    for ax, (name, panel) in zip(axes, PANELS, strict=True):
        has_data[name] = panel(ax, runs, colours)
        if has_data[name] and last > 0:
            ax.set_xlim(0, last * 1.02)
        _epoch_axis(ax, spe, has_data[name])
    if len(runs) > 1:  # the legend of run colours is the headline: one entry per run
        handles = [
            Line2D([], [], color=c, lw=2.5, label=_headline(row))
            for row, c in zip(rows, colours, strict=True)
        ]
        fig.legend(handles=handles, loc="outside upper center", ncol=min(len(runs), 2), fontsize=9)
    else:
        fig.suptitle(_headline(rows[0]), fontsize=13)
    canvas.draw()
    height = fig.bbox.height
    panels = []
    for ax, (name, _) in zip(axes, PANELS, strict=True):
        b = ax.get_window_extent()
        box = [round(b.x0), round(height - b.y1), round(b.x1), round(height - b.y0)]
        panels.append(
            {"name": name, "title": ax.get_title(), "box": box, "has_data": has_data[name]}
        )
    fig.savefig(path, dpi=DPI, metadata={"Software": "sslctl report"})
    return {
        "path": str(path),
        "width": round(fig.bbox.width),
        "height": round(height),
        "panels": panels,
    }
