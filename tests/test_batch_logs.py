"""Progress in batch logs: when stderr is not a terminal (Slurm's output file, ``2>&1 | tee``),
pretrain prints one plain line per train.log_every steps while it trains, and linear-eval and
eval-reid print plain lines for their steps, extraction and ranking — no live bar that shows
nothing until the end."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sslctl import log
from sslctl.cli.app import app
from tests.linear_helpers import (
    TINY_PRETRAIN,
    make_dataset,
    make_split,
    make_weights,
    tiny_sets,
)
from tests.reid_helpers import make_backbone, make_market

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

HMS = r"\d+:\d\d:\d\d"
PRETRAIN_LINE = re.compile(
    rf"^pretrain: step (\d+)/(\d+) \(\d+%\)  epoch (\d+\.\d\d)  loss -?\d+\.\d{{4}}  "
    rf"lr \S+  \d+\.\d img/s  elapsed {HMS}  ETA {HMS}$"
)


def _progress_lines(text: str) -> list[re.Match[str]]:
    return [m for ln in text.splitlines() if (m := PRETRAIN_LINE.match(ln))]


@pytest.mark.slow
def test_pretrain_to_a_file_prints_periodic_plain_lines(tmp_path):
    """As under Slurm: stdout and stderr to one file, no terminal, Python's own buffering
    (no PYTHONUNBUFFERED). Lines must appear while the run trains, not at its end."""
    data = make_split(tmp_path / "images", per_class=12)
    run, logfile = tmp_path / "run", tmp_path / "slurm.out"
    sets = [*TINY_PRETRAIN, "data.image_size=16", "train.epochs=50", "train.log_every=2"]
    cmd = [sys.executable, "-m", "sslctl", "pretrain", "--profile", "demo-cpu", "--out", str(run),
           "--data", str(data), "--tensorboard", *(a for s in sets for a in ("--set", s))]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", COLUMNS="80")
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 240
        while len(_progress_lines(logfile.read_text())) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, logfile.read_text()
            time.sleep(0.5)
        assert proc.poll() is None, (
            "the run ended before its progress was seen: " + logfile.read_text()
        )
        proc.send_signal(signal.SIGTERM)  # a clean stop (exit 3), as Slurm's time limit sends
        assert proc.wait(timeout=120) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
    text = logfile.read_text()
    lines = _progress_lines(text)
    steps = [int(m.group(1)) for m in lines]
    assert len(steps) >= 3 and steps[:3] == [2, 4, 6], text
    assert all(b - a == 2 for a, b in zip(steps, steps[1:], strict=False)), steps
    total = int(lines[0].group(2))
    assert total == 50 * 3  # 36 images / batch 12 = 3 steps per epoch, 50 epochs
    assert float(lines[0].group(3)) == round(2 / 3, 2)
    # plain text: no live bar, no terminal control sequences, no line wrapped at 80 columns
    assert "━" not in text and "\x1b[" not in text
    assert "pretrain signal: step" in text  # stdout's summary is in the same file
    assert list((run / "tb").glob("events.out.tfevents.*"))  # --tensorboard reached the config


@pytest.mark.slow
def test_linear_eval_and_eval_reid_print_plain_lines(tmp_path):
    data, weights = make_dataset(tmp_path / "data"), make_weights(tmp_path / "r18.safetensors")
    args = ["linear-eval", str(weights), "--data", str(data), "--out", str(tmp_path / "lin"),
            "--profile", "linear-demo-cpu", "--device", "cpu"]  # fmt: skip
    r = runner.invoke(app, [*args, *(a for s in tiny_sets() for a in ("--set", s))])
    assert r.exit_code == 0, r.output
    steps = re.findall(rf"^linear-eval: step (\d+)/6 \(\d+%\)  epoch [\d.]+  loss [\d.]+  lr \S+  "
                       rf"[\d.]+ img/s  elapsed {HMS}  ETA {HMS}$", r.output, re.M)  # fmt: skip
    assert steps == [str(s) for s in range(1, 7)], r.output  # linear.log_every = 1
    assert re.search(r"^epoch 2/2: top-1 [\d.]+%", r.output, re.M)

    market, backbone = make_market(tmp_path / "Market"), make_backbone(tmp_path / "bb.safetensors")
    r = runner.invoke(
        app,
        ["eval-reid", str(backbone), "--data", str(market), "--layout", "market1501",
         "--out", str(tmp_path / "reid"), "--workers", "0", "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    for what, n in (("query features: images", 4), ("gallery features: images", 15),
                    ("ranking: queries", 4)):  # fmt: skip
        assert re.search(rf"^{what} {n}/{n} \(100%\)  .*ETA 0:00:00$", r.output, re.M), r.output
    shown = [
        ln for ln in r.output.splitlines() if ln.startswith(("ranking:", "query f", "gallery f"))
    ]
    assert all(re.search(rf"elapsed {HMS}  ETA {HMS}$", ln) for ln in shown), shown  # no bar


def test_plain_progress_throttles_and_always_ends(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(log, "console", Console(file=buf, width=80))  # not a terminal
    with log.make_progress("features", unit="images", plain_every_s=3600) as bar:
        assert isinstance(bar, log.PlainProgress)
        task = bar.add_task("features", total=10, stats="")
        for _ in range(10):
            bar.update(task, advance=1, stats="5 img/s")  # throttled: only the last line
    with log.make_progress("pretrain", unit="step") as bar:
        task = bar.add_task("pretrain", total=4, completed=2, stats="")  # resumed at step 2
        for step in (3, 4):
            bar.update(task, completed=step, stats=f"loss {step}.0")  # a line per stats update
            bar.update(task, completed=step)  # no second line for the same step
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(
        rf"features: images 10/10 \(100%\)  5 img/s  elapsed {HMS}  ETA 0:00:00", lines[0]
    )
    assert lines[1].startswith("pretrain: step 3/4 (75%)  loss 3.0  elapsed ")
    assert lines[2].startswith("pretrain: step 4/4 (100%)  loss 4.0") and lines[2].endswith(
        "ETA 0:00:00"
    )
