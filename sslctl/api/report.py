"""``sslctl report``: read runs (and their evaluations) → report.png, report.md, report.json.

A run still training is fine: what metrics.jsonl holds is read (a half-written last line is
skipped and counted). Without matplotlib the picture is left out and ``png_missing`` says how
to get it; the tables and numbers are written all the same.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sslctl
from sslctl import UserError, log
from sslctl.report import plot, runs, text


@dataclass(frozen=True)
class ReportResult:
    report: dict[str, Any]  # the content of report.json
    json_path: Path
    markdown_path: Path
    png_path: Path | None  # None: matplotlib is missing (report["png_missing"] says so)


def default_out(paths: Sequence[Path]) -> Path:
    """RUN/report/ for one run, ./report/ for several."""
    return paths[0] / "report" if len(paths) == 1 else Path("report")


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is an existing file, not a folder: choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"-o {out}: cannot create it ({e.strerror or e}); choose a writable folder"
        ) from None


def json_safe(v: Any) -> Any:
    """Non-finite floats as the strings metrics.jsonl uses ("nan", "inf"): strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def _write(path: Path, content: str) -> None:
    tmp = path.with_name(f".sslctl-tmp.{path.name}")
    try:
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror or e}); choose another -o") from None


def _picture(
    loaded: list[runs.Run], rows: list[dict[str, Any]], out: Path
) -> dict[str, Any] | None:
    if not plot.available():
        return None
    png = out / "report.png"
    tmp = out / ".sslctl-tmp.report.png"
    drawn = plot.draw(loaded, rows, tmp)
    os.replace(tmp, png)
    return {**drawn, "path": str(png)}


def report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    evals: Sequence[str | os.PathLike[str]] = (),
) -> ReportResult:
    """Report on the pre-training runs ``run_dirs`` (several: overlaid, one colour each), with
    the evaluation results in ``evals`` (folders of linear-eval / knn-eval / eval-reid, or their
    results.json), into ``out`` (default: RUN/report/ for one run, ./report/ for several).

    >>> api.report(["runs/demo"], evals=["runs/demo-eval"])
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise UserError("give at least one run directory (the --out of `sslctl pretrain`)")
    names = runs.unique_names(paths)
    loaded = [runs.load_run(p, n) for p, n in zip(paths, names, strict=True)]
    evaluations = [runs.load_evaluation(Path(e)) for e in evals]
    out_dir = Path(out) if out is not None else default_out(paths)
    _prepare_out(out_dir)
    unmatched = runs.attach(loaded, evaluations)
    for e in unmatched:
        log.warn(f"--eval {e.path}: its weights ({e.weights}) are in none of the runs given")
    rows = [runs.summarise(r) for r in loaded]
    picture = _picture(loaded, rows, out_dir)
    doc: dict[str, Any] = {
        "sslctl_version": sslctl.__version__,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "runs": rows,
        "unmatched_evaluations": [e.to_dict() for e in unmatched],
        "png": picture,
        "png_missing": None if picture else plot.MISSING,
    }
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    _write(json_path, json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    _write(md_path, text.markdown(doc))
    png = Path(picture["path"]) if picture else None
    return ReportResult(doc, json_path, md_path, png)
