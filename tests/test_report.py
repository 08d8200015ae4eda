"""``sslctl report``: the picture (decodes, its size, a curve in every panel), report.json's
numbers (equal to those computed here from metrics.jsonl), several runs, a run still being
written, no matplotlib, evaluations and the paper's numbers, and the one-line errors."""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sslctl import UserError, __version__, api
from sslctl.cli.app import app
from sslctl.log import read_jsonl
from sslctl.report import plot
from tests.report_helpers import colour_pixels, fake_knn, load_png, short_run

runner = CliRunner()
BLUE, ORANGE = plot.COLOURS[0], plot.COLOURS[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two real runs: Triplet (with a paper number in its config) and BYOL at another lr."""
    base = tmp_path_factory.mktemp("report")
    a, b = base / "triplet", base / "byol"
    short_run(a, "paper.imagenet_top1=75.9", "paper.sysu30k_rank1=14.8")
    short_run(b, "method.name=byol", "optim.lr=3e-3", seed=1, knn=fake_knn(30.0, 5.0))
    return a, b


def _expected(run: Path) -> dict:
    """The report's numbers, computed here from metrics.jsonl."""
    recs = read_jsonl(run / "metrics.jsonl")
    train = [r for r in recs if "loss" in r]
    knn = [r for r in recs if "knn_top1" in r]
    best = max(knn, key=lambda r: r["knn_top1"])
    times = [r["time"] for r in recs if "event" not in r]
    return {
        "step": train[-1]["step"],
        "epoch": train[-1]["epoch"],
        "final_loss": train[-1]["loss"],
        "img_s_mean": statistics.fmean(r["img_s"] for r in train),
        "knn_top1_final": knn[-1]["knn_top1"],
        "knn_top1_best": best["knn_top1"],
        "knn_best_step": best["step"],
        "wall_time_s": max(times) - min(times),
        "records": len(train),
        "knn_records": len(knn),
    }


def test_one_run_picture_and_numbers(runs, tmp_path):
    run = runs[0]
    res = api.report([run], tmp_path / "out")
    doc = json.loads(res.json_path.read_text())
    assert doc["sslctl_version"] == __version__
    (row,) = doc["runs"]
    for key, want in _expected(run).items():
        assert row[key] == pytest.approx(want, rel=1e-9, abs=1e-6), key
    assert row["knn_top1_final"] < row["knn_top1_best"]  # the fake monitor dips at the end
    assert row["status"] == "complete" and row["stopped"] == "done"
    assert (row["method"], row["network"], row["profile"]) == ("triplet", "convnet4", "demo-cpu")
    assert row["steps_planned"] == 12 and row["epochs_planned"] == 4 and row["step"] == 12
    assert row["skipped_lines"] == 0 and row["sslctl_version"] == __version__

    pix = load_png(res.png_path)
    w, h = round(plot.FIG_W_IN * plot.DPI), round(plot.FIG_H_IN * plot.DPI)
    assert pix.shape == (h, w, 3) and doc["png"]["width"] == w and doc["png"]["height"] == h
    panels = {p["name"]: p for p in doc["png"]["panels"]}
    assert list(panels) == ["loss", "schedule", "method", "feat_std", "knn", "throughput"]
    for name, p in panels.items():
        left, top, right, bottom = p["box"]
        assert 0 <= left < right <= w and 0 <= top < bottom <= h, name
        inside = pix[top + 4 : bottom - 4, left + 4 : right - 4]  # within the frame
        assert p["has_data"] and inside.var() > 100, name  # not a blank panel
        assert colour_pixels(pix, p["box"], BLUE) > 40, name  # the run's curve is drawn in it
    assert "d_ap" in panels["method"]["title"] and "d_an" in panels["method"]["title"]

    md = res.markdown_path.read_text()
    assert "![curves of the runs](report.png)" in md and "| status | complete |" in md
    assert "demo-cpu" in md and f"{row['knn_top1_best']:.2f} %" in md


def test_cli_two_runs_overlay_with_a_legend(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # several runs: ./report/ by default
    r = runner.invoke(app, ["report", str(runs[0]), str(runs[1])])
    assert r.exit_code == 0, r.output
    out = tmp_path / "report"
    assert f"report.png: {Path('report') / 'report.png'}" in r.output
    doc = json.loads((out / "report.json").read_text())
    assert [x["name"] for x in doc["runs"]] == ["triplet", "byol"]
    for run, row in zip(runs, doc["runs"], strict=True):
        assert row["step"] == _expected(run)["step"]
        assert row["knn_top1_best"] == _expected(run)["knn_top1_best"]
    pix = load_png(out / "report.png")
    panels = {p["name"]: p for p in doc["png"]["panels"]}
    for name in ("loss", "schedule", "feat_std", "knn", "throughput"):
        assert colour_pixels(pix, panels[name]["box"], BLUE) > 40, name
        assert colour_pixels(pix, panels[name]["box"], ORANGE) > 40, name
    # BYOL logs no d_ap/d_an: the method panel shows Triplet's only
    assert colour_pixels(pix, panels["method"]["box"], ORANGE) < 5
    md = (out / "report.md").read_text()
    assert "| run | method | network |" in md and "| byol | byol | convnet4 |" in md


@pytest.fixture
def no_picture(monkeypatch):
    """For tests about the tables only: drawing takes seconds on a busy 2-core machine."""
    monkeypatch.setattr(plot, "available", lambda: False)


def test_a_run_still_being_written(runs, tmp_path, monkeypatch):
    run = tmp_path / "live"
    shutil.copytree(runs[0], run)
    (run / "status.json").unlink()  # no status yet: it trains
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"time": 1.0, "loss": 0.5, "step": 13, "ep')  # half-written last line
    res = api.report([run], tmp_path / "out")
    row = res.report["runs"][0]
    assert row["skipped_lines"] == 1 and row["step"] == 12 and row["status"] == "running"
    assert res.png_path is not None and res.png_path.is_file()
    monkeypatch.setattr(plot, "available", lambda: False)  # the tables suffice from here
    old = time.time() - 7200  # two hours without a record and no status: not running
    os.utime(run / "metrics.jsonl", (old, old))
    row = api.report([run], tmp_path / "out").report["runs"][0]
    assert row["status"] == "stopped without a status (killed?)"
    # RUN/.lock names a live process of this host that took it (as DirLock writes it): running
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
    (run / ".lock").write_text(json.dumps(owner) + "\n")
    assert api.report([run], tmp_path / "out").report["runs"][0]["status"] == "running"
    (run / ".lock").write_text(json.dumps({**owner, "since": "2001-01-01T00:00:00+00:00"}))
    row = api.report([run], tmp_path / "out").report["runs"][0]  # that pid is another process now
    assert row["status"] == "stopped without a status (killed?)"


def test_without_matplotlib_the_tables_are_still_written(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    r = runner.invoke(app, ["report", str(runs[0]), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "pip install 'sslctl[plot]'" in r.output
    out = tmp_path / "out"
    assert not (out / "report.png").exists()
    doc = json.loads((out / "report.json").read_text())
    assert doc["png"] is None and "sslctl[plot]" in doc["png_missing"]
    assert doc["runs"][0]["step"] == _expected(runs[0])["step"]
    assert "No picture" in (out / "report.md").read_text()


def _results(path: Path, content: dict) -> Path:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(content))
    return path


def test_evaluations_and_the_papers_numbers(runs, tmp_path, no_picture):
    run = runs[0]
    weights = str(run / "checkpoints")
    lin = _results(
        tmp_path / "lin",
        {"protocol": "standard", "top1": 71.25, "top5": 90.0, "best_top1": 71.5, "epochs": 100,
         "val": "/data/imagenet/val", "weights": weights, "random_init": {"top1": 4.0},
         "sslctl_version": __version__},
    )  # fmt: skip
    reid = _results(
        tmp_path / "reid",
        {"rank1": 12.5, "rank5": 20.0, "rank10": 25.0, "mAP": 3.5, "layout": "sysu30k",
         "weights": {"path": weights, "file": weights}, "data": {"gallery": "/data/sysu/test"}},
    )  # fmt: skip
    res = api.report([run], tmp_path / "out", evals=[lin, reid / "results.json"])
    row = res.report["runs"][0]
    assert [e["kind"] for e in row["evaluations"]] == ["linear-eval", "eval-reid"]
    assert row["paper"] == [
        {"metric": "ImageNet linear top-1 %", "paper": 75.9, "measured": 71.25,
         "protocol": "standard", "evaluation": str(lin / "results.json")},
        {"metric": "SYSU-30k rank-1 %", "paper": 14.8, "measured": 12.5, "protocol": None,
         "evaluation": str(reid / "results.json")},
    ]  # fmt: skip
    md = res.markdown_path.read_text()
    assert "| ImageNet linear top-1 % | 75.90 % | 71.25 % |" in md
    assert "| SYSU-30k rank-1 % | 14.80 % | 12.50 % |" in md
    assert "rank-1 12.50 %, mAP 3.50 %" in md and "4.00 %" in md  # random init beside it
    # without an evaluation the paper's number is still shown, as not evaluated yet
    bare = api.report([run], tmp_path / "bare").report["runs"][0]["paper"][0]
    assert bare["measured"] is None and bare["paper"] == 75.9
    assert math.isclose(bare["paper"], 75.9)


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda run, empty: [str(empty.parent / "nowhere")], "no such directory"),
        (lambda run, empty: [str(empty)], "no metrics.jsonl"),
        (lambda run, empty: [str(run), "--eval", str(empty)], "no results.json there"),
    ],
)
def test_user_mistakes_are_one_line(runs, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["report", *args(runs[0], empty), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1


def test_a_panel_without_data_says_so(tmp_path):
    """No kNN monitor: its panel holds a note and none of the run's colour; the others draw."""
    run = tmp_path / "noknn"
    short_run(run, "eval.knn_every=0", "train.epochs=1")
    res = api.report([run], tmp_path / "out")
    panels = {p["name"]: p for p in res.report["png"]["panels"]}
    assert not panels["knn"]["has_data"] and panels["loss"]["has_data"]
    pix = load_png(res.png_path)
    assert colour_pixels(pix, panels["knn"]["box"], BLUE) == 0
    assert colour_pixels(pix, panels["loss"]["box"], BLUE) > 40
    row = res.report["runs"][0]
    assert row["knn_top1_final"] is None and row["knn_top1_best"] is None
    assert "no kNN monitor records" in res.markdown_path.read_text()
    with pytest.raises(UserError, match="at least one run"):
        api.report([])


def test_hand_edited_runs_do_not_crash_the_report(tmp_path):
    """Records without an epoch, a config.yaml whose train.epochs is not a number of epochs, and
    only some keys: the tables and the picture are still written."""
    run = tmp_path / "odd"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.5, "time": 1.0}\n{"step": 2, "loss": "nan", "time": 2.0}\n'
    )
    (run / "config.yaml").write_text("method: {name: simclr}\ntrain: {epochs: .nan}\n")
    res = api.report([run], tmp_path / "out")
    row = res.report["runs"][0]
    assert row["step"] == 2 and row["epochs_planned"] is None and row["method"] == "simclr"
    assert "step 2 · epoch —" in res.markdown_path.read_text()
