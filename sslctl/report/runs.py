"""Reading a run directory (metrics.jsonl, config.yaml, status.json) and evaluation results,
and the numbers ``sslctl report`` shows for them. No torch: a report of a run in progress is
read while it trains, possibly on another machine."""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sslctl import UserError

# Keys of a training record that are not curves of their own (or are drawn in a fixed panel).
BOOKKEEPING = frozenset({"step", "epoch", "time", "event", "loss_scale", "changes"})
FIXED_PANELS = frozenset({"loss", "lr", "momentum", "feat_std", "img_s"})
KNN_KEY = "knn_top1"  # what the eval.knn_every monitor records (sslctl.eval.knn.knn_monitor)
# A gap between two records longer than this (and than PAUSE_FACTOR typical intervals) is time
# the run did not run (a requeued job waiting for its next allocation): not counted as wall time.
PAUSE_S = 1800.0
PAUSE_FACTOR = 20.0
# A run with no status for its newest records, whose metrics were written this recently and
# whose lock owner cannot be checked (another host), is taken to be running.
FRESH_S = 900.0

STATUS_TEXT = {
    "done": "complete",
    "max_steps": "stopped at --max-steps",
    "signal": "stopped by signal",
    "diverged": "diverged",
}


@dataclass
class Evaluation:
    """One evaluation's results.json, reduced to its headline numbers."""

    kind: str  # linear-eval | knn-eval | eval-reid
    path: Path  # the results.json read
    weights: str  # the weights it evaluated, as recorded (to attach it to its run)
    numbers: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "weights": self.weights, **self.numbers}


@dataclass
class Run:
    path: Path
    name: str
    train: list[dict[str, Any]]  # training records (with "loss"), by step
    knn: list[dict[str, Any]]  # kNN monitor records (with "knn_top1"), by step
    events: list[dict[str, Any]]
    skipped_lines: int  # lines that did not parse (a half-written last one while it trains)
    config: dict[str, Any]  # config.yaml ({} when absent)
    header: dict[str, str]  # from config.yaml's comment lines: version, data
    status: dict[str, Any] | None  # status.json
    evaluations: list[Evaluation] = field(default_factory=list)


def number(v: Any) -> float | None:
    """A record's value as a float: numbers, and the "nan"/"inf" strings metrics.jsonl writes
    for non-finite values; None for anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf"):
        return float(v)
    return None


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a JSONL file and the number of lines skipped (torn or not JSON)."""
    records: list[dict[str, Any]] = []
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                skipped += 1
    return records, skipped


def _by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sorted by step; of two records for one step the later one is kept."""
    keep: dict[float, dict[str, Any]] = {}
    for r in records:
        s = number(r.get("step"))
        if s is not None and math.isfinite(s):
            keep[s] = r
    return [keep[s] for s in sorted(keep)]


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if not path.is_file():
        return {}, {}
    text = path.read_text(encoding="utf-8", errors="replace")
    header: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        words = line[1:].split()
        if len(words) >= 2 and words[0] == "sslctl":
            header["sslctl_version"] = words[1].rstrip(":")
        elif words and words[0] == "data:":
            header["data"] = line.split("data:", 1)[1].strip()
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        cfg = None
    return (cfg if isinstance(cfg, dict) else {}), header


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_run(path: Path, name: str | None = None) -> Run:
    """Everything ``report`` reads from a pre-training run directory (one that trains is fine)."""
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise UserError(f"RUN {path}: no such directory; give a pre-training run directory")
    if not metrics.is_file():
        hint = (
            " (an evaluation's folder? give it with --eval)"
            if (path / "results.json").is_file()
            else ""
        )
        raise UserError(
            f"RUN {path}: no metrics.jsonl{hint}; give the --out directory of `sslctl pretrain`"
        )
    records, skipped = read_records(metrics)
    events = [r for r in records if "event" in r]
    rest = [r for r in records if "event" not in r]
    knn = _by_step([r for r in rest if number(r.get(KNN_KEY)) is not None])
    train = _by_step([r for r in rest if "loss" in r and KNN_KEY not in r])
    cfg, header = _read_config(path / "config.yaml")
    status = _read_json(path / "status.json")
    return Run(path, name or path.name, train, knn, events, skipped, cfg, header, status)


def unique_names(paths: list[Path]) -> list[str]:
    """Each run's folder name, with its parent's where two would read the same."""
    names = [p.resolve().name or str(p) for p in paths]
    return [
        f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for p, n in zip(paths, names, strict=True)
    ]


# ----------------------------------------------------------------- evaluations (--eval DIR)
def _weights_of(r: dict[str, Any]) -> str:
    w = r.get("weights")
    if isinstance(w, dict):  # eval-reid: {"path": as given, "file": resolved, ...}
        w = w.get("file") or w.get("path")
    return str(w) if w else ""


def _random_top1(r: dict[str, Any]) -> float | None:
    rnd = r.get("random_init")
    return number(rnd.get("top1")) if isinstance(rnd, dict) else None


def _evaluation_numbers(r: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    protocol = r.get("protocol")
    if "rank1" in r:
        reid = ("rank1", "rank5", "rank10", "mAP", "layout", "num_queries", "data")
        return "eval-reid", {k: r.get(k) for k in reid}
    keep: tuple[str, ...]
    if protocol in ("standard", "cached"):
        keep = ("protocol", "top1", "top5", "best_top1", "best_epoch", "epochs", "knn_top1", "val")
        kind = "linear-eval"
    elif protocol == "knn":
        keep = ("protocol", "top1", "top5", "k", "temperature", "val")
        kind = "knn-eval"
    else:
        return None
    return kind, {k: r[k] for k in keep if k in r} | {"random_init_top1": _random_top1(r)}


def load_evaluation(path: Path) -> Evaluation:
    """An evaluation's results.json (``path``: its folder, or the file itself)."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(
            f"--eval {path}: no results.json there; give the --out folder of linear-eval, "
            "knn-eval or eval-reid (after it finished)"
        )
    r = _read_json(file)
    found = _evaluation_numbers(r) if r is not None else None
    if r is None or found is None:
        raise UserError(
            f"--eval {path}: {file} is not the results.json of linear-eval, knn-eval or eval-reid"
        )
    kind, numbers = found
    numbers["sslctl_version"] = r.get("sslctl_version")
    return Evaluation(kind, file, _weights_of(r), numbers)


def _inside(weights: str, run: Path) -> bool:
    if not weights:
        return False
    w, root = Path(weights).resolve(), run.resolve()
    return w == root or root in w.parents


def attach(runs: list[Run], evaluations: list[Evaluation]) -> list[Evaluation]:
    """Give each evaluation to the run whose weights it evaluated (with one run: to it);
    the ones that match no run are returned."""
    unmatched = []
    for e in evaluations:
        owner = runs[0] if len(runs) == 1 else None
        owner = next((r for r in runs if _inside(e.weights, r.path)), owner)
        if owner is None:
            unmatched.append(e)
        else:
            owner.evaluations.append(e)
    return unmatched


# ----------------------------------------------------------------- the numbers of a run
def steps_per_epoch(run: Run) -> float | None:
    """Optimizer steps per epoch, from the newest record's step/epoch (None: not yet known)."""
    for r in reversed(run.train):
        step, epoch = number(r.get("step")), number(r.get("epoch"))
        if step and epoch and epoch > 0 and math.isfinite(epoch):
            return step / epoch
    return None


def wall_seconds(run: Run) -> float | None:
    """Time from the first to the last record, less pauses (gaps of PAUSE_S and more than
    PAUSE_FACTOR typical intervals: a requeued job waiting to start again)."""
    times = sorted(
        t for r in run.train + run.knn if (t := number(r.get("time"))) and math.isfinite(t)
    )
    if len(times) < 2:
        return None
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    typical = statistics.median(gaps)
    return sum(g for g in gaps if not (g > PAUSE_S and g > PAUSE_FACTOR * typical))


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (Unix time, from /proc); None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(ln.split()[1])
            for ln in Path("/proc/stat").read_text().splitlines()
            if ln.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    ticks = float(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime (after "comm")
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _owner_alive(path: Path) -> bool | None:
    """Whether the process that took RUN/.lock (sslctl.rundir.DirLock writes pid, host and
    time) still runs: False when it is gone, or its pid now names a process started later
    (a reused pid); None when that cannot be told from here (another host, no /proc)."""
    info = _read_json(path / ".lock")
    if info is None or info.get("host") != socket.gethostname():
        return None
    pid, since = info.get("pid"), info.get("since")
    if not isinstance(pid, int) or pid <= 0 or not isinstance(since, str):
        return None
    try:
        locked = datetime.datetime.fromisoformat(since).timestamp()
    except ValueError:
        return None
    if not Path("/proc/self/stat").exists():
        return None
    started = _process_start(pid)
    return started is not None and started <= locked + 2.0  # "since" has whole seconds


def run_status(run: Run) -> str:
    """running | complete | stopped by signal | diverged | stopped at --max-steps | stopped
    without a status (killed?)."""
    alive = _owner_alive(run.path)
    if alive:
        return "running"
    last = number(run.train[-1].get("step")) if run.train else 0.0
    st = run.status or {}
    if st.get("stopped") in STATUS_TEXT and (number(st.get("step")) or 0) >= (last or 0):
        return STATUS_TEXT[st["stopped"]]
    age = time.time() - (run.path / "metrics.jsonl").stat().st_mtime
    if alive is None and age < FRESH_S:
        return "running"
    return "stopped without a status (killed?)"


def _whole(v: float | None) -> int | float | None:
    """A step as an int in report.json (floats only for what is not whole)."""
    return int(v) if v is not None and math.isfinite(v) and v == int(v) else v


def _finite(values: list[Any]) -> list[float]:
    return [v for v in (number(x) for x in values) if v is not None and math.isfinite(v)]


def _knn_numbers(run: Run) -> dict[str, Any]:
    pts: list[tuple[dict[str, Any], float]] = []
    for r in run.knn:
        v = number(r.get(KNN_KEY))
        if v is not None and math.isfinite(v):
            pts.append((r, v))
    if not pts:
        return {"knn_top1_final": None, "knn_top1_best": None, "knn_best_step": None}
    best = max(pts, key=lambda p: p[1])
    return {
        "knn_top1_final": pts[-1][1],
        "knn_final_epoch": number(pts[-1][0].get("epoch")),
        "knn_top1_best": best[1],
        "knn_best_step": _whole(number(best[0].get("step"))),
        "knn_best_epoch": number(best[0].get("epoch")),
    }


def profile_name(cfg: dict[str, Any]) -> str:
    """The bundled profile whose description the run's config carries ("" when none does: a
    profile file of the user's, or one changed since)."""
    from sslctl.config import PROFILE_DIR

    want = cfg.get("description")
    if not want:
        return ""
    for p in sorted(PROFILE_DIR.glob("*.yaml")):
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(doc, dict) and doc.get("description") == want:
            return p.stem
    return ""


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    s = cfg.get(name)
    return s if isinstance(s, dict) else {}


def paper_comparison(run: Run) -> list[dict[str, Any]]:
    """The published numbers the run's profile names (paper.*), each beside the measured one
    from the run's evaluations (standard linear protocol preferred to the cached proxy)."""
    paper = _section(run.config, "paper")
    rows: list[dict[str, Any]] = []
    wanted = (
        ("imagenet_top1", "ImageNet linear top-1 %", "linear-eval", "top1"),
        ("sysu30k_rank1", "SYSU-30k rank-1 %", "eval-reid", "rank1"),
    )
    for key, label, kind, metric in wanted:
        published = number(paper.get(key))
        if not published:
            continue
        evals = [e for e in run.evaluations if e.kind == kind]
        evals.sort(key=lambda e: e.numbers.get("protocol") == "standard")  # standard last
        e = evals[-1] if evals else None
        rows.append(
            {
                "metric": label,
                "paper": published,
                "measured": number(e.numbers.get(metric)) if e else None,
                "protocol": e.numbers.get("protocol") if e else None,
                "evaluation": str(e.path) if e else None,
            }
        )
    return rows


def summarise(run: Run) -> dict[str, Any]:
    """The run's row of report.md / report.json."""
    last = run.train[-1] if run.train else {}
    cfg = run.config
    spe = steps_per_epoch(run)
    epochs = number(_section(cfg, "train").get("epochs"))
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        epochs = None  # a config.yaml edited by hand: no plan to measure progress against
    st = run.status or {}
    img_s = _finite([r.get("img_s") for r in run.train])
    return {
        "name": run.name,
        "path": str(run.path.resolve()),
        "method": _section(cfg, "method").get("name"),
        "network": _section(cfg, "model").get("arch"),
        "profile": profile_name(cfg),
        "description": cfg.get("description"),
        "data_root": st.get("data_root")
        or run.header.get("data")
        or _section(cfg, "data").get("root"),
        "step": _whole(number(last.get("step"))),
        "epoch": number(last.get("epoch")),
        "epochs_planned": epochs,
        "steps_planned": round(epochs * spe) if epochs and spe else None,
        "steps_per_epoch": spe,
        "final_loss": number(last.get("loss")),
        **_knn_numbers(run),
        "wall_time_s": wall_seconds(run),
        "img_s_mean": statistics.fmean(img_s) if img_s else None,
        "status": run_status(run),
        "stopped": st.get("stopped"),
        "records": len(run.train),
        "knn_records": len(run.knn),
        "skipped_lines": run.skipped_lines,
        "events": [r.get("event") for r in run.events],
        "sslctl_version": run.header.get("sslctl_version") or st.get("sslctl_version"),
        "evaluations": [e.to_dict() for e in run.evaluations],
        "paper": paper_comparison(run),
    }
