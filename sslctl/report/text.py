"""report.md: the numbers of report.json as Markdown tables, one per run."""

from __future__ import annotations

import math
from typing import Any


def _num(v: Any, fmt: str = "{:.4g}", unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return fmt.format(v) + unit


def _pct(v: Any) -> str:
    return _num(v, "{:.2f}", " %")


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _progress(r: dict[str, Any]) -> str:
    if r.get("step") is None:
        return "no training record yet"
    step = f"step {r['step']:.0f}" + (f" of {r['steps_planned']}" if r.get("steps_planned") else "")
    epochs = r.get("epochs_planned")
    epoch = f"epoch {_num(r.get('epoch'), '{:.2f}')}" + (f" of {epochs:g}" if epochs else "")
    return f"{step} · {epoch}"


def _knn(r: dict[str, Any]) -> str:
    if r.get("knn_top1_final") is None:
        return "— (no kNN monitor records)"
    final = f"final {_pct(r['knn_top1_final'])} (epoch {_num(r.get('knn_final_epoch'), '{:.0f}')})"
    best = f"best {_pct(r['knn_top1_best'])} (epoch {_num(r.get('knn_best_epoch'), '{:.0f}')})"
    return f"{final} · {best}"


def _profile(r: dict[str, Any]) -> str:
    if r.get("profile"):
        return f"{r['profile']} ({r.get('description') or ''})".replace(" ()", "")
    return f"not a bundled profile: {r['description']}" if r.get("description") else "—"


def run_table(r: dict[str, Any]) -> list[str]:
    rows = [
        ("status", r["status"]),
        ("method", r.get("method") or "—"),
        ("network", r.get("network") or "—"),
        ("profile", _profile(r)),
        ("data root", f"`{r['data_root']}`" if r.get("data_root") else "—"),
        ("progress", _progress(r)),
        ("final loss", _num(r.get("final_loss"), "{:.6g}")),
        ("kNN top-1 (monitor)", _knn(r)),
        ("wall time", hms(r.get("wall_time_s")) + " (first to last record, pauses left out)"),
        ("mean throughput", _num(r.get("img_s_mean"), "{:.1f}", " img/s")),
        ("sslctl", r.get("sslctl_version") or "—"),
    ]
    if r.get("skipped_lines"):
        rows.append(("unreadable lines", f"{r['skipped_lines']} (a half-written last line?)"))
    out = [f"## {r['name']}", "", f"`{r['path']}`", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return out


def _eval_result(e: dict[str, Any]) -> tuple[str, str, str]:
    """(what, result, random init) of one evaluation."""
    kind = e["kind"]
    if kind == "eval-reid":
        what = f"eval-reid ({e.get('layout') or '?'})"
        res = f"rank-1 {_pct(e.get('rank1'))}, mAP {_pct(e.get('mAP'))}"
        return what, res, "—"
    proto = e.get("protocol")
    if kind == "linear-eval":
        what = "linear-eval, " + (
            "cached-feature proxy" if proto == "cached" else "standard protocol"
        )
        res = f"top-1 {_pct(e.get('top1'))} (best {_pct(e.get('best_top1'))})"
        if e.get("knn_top1") is not None:
            res += f"; kNN top-1 {_pct(e['knn_top1'])}"
    else:
        what = f"knn-eval (k = {e.get('k')})"
        res = f"top-1 {_pct(e.get('top1'))}"
    return what, res, _pct(e.get("random_init_top1"))


def _evaluated_on(e: dict[str, Any]) -> str:
    if e.get("val"):
        return str(e["val"])
    data = e.get("data")  # eval-reid: {"query": root, "gallery": root}
    if isinstance(data, dict):
        return str(data.get("gallery") or data.get("query") or "—")
    return "—"


def evaluations_table(evals: list[dict[str, Any]]) -> list[str]:
    if not evals:
        return ["No evaluation given (`sslctl report RUN --eval DIR`).", ""]
    out = [
        "| evaluation | result | random init | evaluated on | results.json |",
        "|---|---|---|---|---|",
    ]
    for e in evals:
        what, res, rnd = _eval_result(e)
        out.append(f"| {what} | {res} | {rnd} | `{_evaluated_on(e)}` | `{e['path']}` |")
    return [*out, ""]


def paper_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = [
        "| published (the profile's paper number) | paper | measured | by |",
        "|---|---|---|---|",
    ]
    for p in rows:
        by = (
            f"{p['protocol'] or 'eval-reid'}: `{p['evaluation']}`"
            if p["evaluation"]
            else "not evaluated yet"
        )
        if p.get("protocol") == "cached":
            by += " (cached proxy, not the paper's protocol)"
        out.append(f"| {p['metric']} | {_pct(p['paper'])} | {_pct(p['measured'])} | {by} |")
    return [*out, ""]


def comparison_table(rows: list[dict[str, Any]]) -> list[str]:
    head = "| run | method | network | progress | final loss | kNN top-1 final / best | img/s | status |"
    out = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        knn = f"{_pct(r.get('knn_top1_final'))} / {_pct(r.get('knn_top1_best'))}"
        out.append(
            f"| {r['name']} | {r.get('method') or '—'} | {r.get('network') or '—'} | "
            f"{_progress(r)} | {_num(r.get('final_loss'), '{:.6g}')} | {knn} | "
            f"{_num(r.get('img_s_mean'), '{:.1f}')} | {r['status']} |"
        )
    return [*out, ""]


def markdown(doc: dict[str, Any]) -> str:
    """report.md from report.json's content."""
    rows = doc["runs"]
    out = ["# sslctl report", "", f"sslctl {doc['sslctl_version']} · {doc['created']}", ""]
    png = doc.get("png")
    if png:
        out += ["![curves of the runs](report.png)", ""]
    else:
        out += [f"(No picture: {doc.get('png_missing')})", ""]
    if len(rows) > 1:
        out += comparison_table(rows)
    for r in rows:
        out += [*run_table(r), "", "### Evaluations", ""]
        out += evaluations_table(r["evaluations"])
        out += paper_table(r["paper"])
    if doc.get("unmatched_evaluations"):
        out += ["## Evaluations of none of these runs", ""]
        out += evaluations_table(doc["unmatched_evaluations"])
    return "\n".join(out).rstrip() + "\n"
