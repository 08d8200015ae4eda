"""log.tensorboard / --tensorboard: RUN/tb/ holds every scalar of metrics.jsonl at its step,
read back with TensorBoard's own EventAccumulator; a missing package is one line."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sslctl import UserError, log
from sslctl.cli.app import app
from tests.linear_helpers import make_dataset, make_weights, tiny_sets
from tests.report_helpers import short_run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    SCALARS,
    EventAccumulator,
)

runner = CliRunner()


def _events(tb: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb), size_guidance={SCALARS: 0})  # 0: keep every event
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _expected(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of metrics.jsonl as (step, value), by key."""
    want: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rec in log.read_jsonl(metrics):
        for k, v in rec.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                want[k].append((rec["step"], float(v)))
    return want


def _assert_same(events: dict, want: dict) -> None:
    assert set(events) == set(want)
    for key, points in want.items():
        got = events[key]
        assert [s for s, _ in got] == [s for s, _ in points], key  # each step once, in order
        for (step, v), (_, g) in zip(points, got, strict=True):
            assert math.isclose(g, v, rel_tol=1e-6, abs_tol=1e-9), (key, step, g, v)


def test_pretrain_events_hold_every_metric_at_its_step(tmp_path):
    run = tmp_path / "run"
    first = short_run(run, "log.tensorboard=true", max_steps=5)
    assert first.stopped == "max_steps"
    # what a run killed after its step-5 checkpoint would have left: steps 6 and 7 in both
    lost = log.MetricsWriter(run / "metrics.jsonl", run / "tb", first_step=6)
    for step in (6, 7):
        lost.write({"step": step, "loss": 1e3 + step, "lr": 9.0, "stale": 1.0})
    lost.close()
    short_run(run, "log.tensorboard=true")  # resumes from step 5: a third event file
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 3
    want = _expected(run / "metrics.jsonl")
    assert {"loss", "lr", "momentum", "img_s", "d_ap", "d_an", "feat_std", "knn_top1"} <= set(want)
    assert [s for s, _ in want["loss"]] == list(range(1, 13))
    events = _events(run / "tb")
    # metrics.jsonl lost steps 6-7 of the killed run; TensorBoard hides them too (purge_step)
    assert events.pop("stale", []) == [] and "stale" not in want
    _assert_same(events, want)


def test_linear_eval_tensorboard_flag(tmp_path):
    data, weights = make_dataset(tmp_path / "data"), make_weights(tmp_path / "r18.safetensors")
    out = tmp_path / "lin"
    sets = [a for s in tiny_sets() for a in ("--set", s)]
    r = runner.invoke(
        app,
        ["linear-eval", str(weights), "--data", str(data), "--out", str(out), "--tensorboard",
         "--profile", "linear-demo-cpu", "--device", "cpu", *sets],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    want = _expected(out / "metrics.jsonl")
    assert {"loss", "lr", "top1", "top5", "best_top1", "train_loss"} <= set(want)
    _assert_same(_events(out / "tb"), want)


def test_without_the_package_one_line_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    r = runner.invoke(
        app, ["pretrain", "--profile", "demo-cpu", "--out", str(out), "--tensorboard"]
    )
    assert r.exit_code == 2, r.output
    assert "pip install 'sslctl[tensorboard]'" in r.output and "Traceback" not in r.output
    assert not out.exists()  # refused before anything was made
    with pytest.raises(UserError, match=r"sslctl\[tensorboard\]"):
        log.MetricsWriter(tmp_path / "m.jsonl", tmp_path / "tb")
