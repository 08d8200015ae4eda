"""``sslctl report``: a run's curves, tables and numbers (one run, or several overlaid)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslctl.cli.common import err_console, out_console, user_errors

# torch (through sslctl.api) is imported inside the command: `sslctl --help` stays fast.

HELP = (
    "Report on pre-training runs: report.png (loss, lr and target momentum, the method's own "
    "statistics, feat_std against 1/sqrt(d) and collapse, the kNN monitor, img/s; several runs "
    "overlaid, one colour each), report.md (a table per run: method, network, profile, data, "
    "progress, kNN, wall time, img/s, status, evaluations and the paper's number beside the "
    "measured one) and report.json (the same numbers). Runs still training are fine. Default "
    "output: RUN/report/ for one run, ./report/ for several. The picture needs matplotlib "
    "(pip install 'sslctl[plot]')."
)


@user_errors
def command(
    runs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN", help="run directories (the --out of sslctl pretrain)"),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="DIR",
            help="output folder (default: RUN/report/ for one run, ./report/ for several)",
        ),
    ] = None,
    eval_: Annotated[
        list[Path] | None,
        typer.Option(
            "--eval",
            metavar="DIR",
            help="results of linear-eval, knn-eval or eval-reid (their --out, or results.json); "
            "repeatable; each goes to the run whose weights it evaluated",
        ),
    ] = None,
) -> None:
    from sslctl import api

    res = api.report(runs, out, eval_ or ())
    if res.png_path is None:
        err_console.print(f"note: {res.report['png_missing']}", markup=False, soft_wrap=True)
    for r in res.report["runs"]:
        out_console.print(f"{r['name']}: {r['status']}", markup=False, soft_wrap=True)
    out_console.print(f"report.md: {res.markdown_path}", markup=False, soft_wrap=True)
    out_console.print(f"report.json: {res.json_path}", markup=False, soft_wrap=True)
    if res.png_path is not None:
        out_console.print(f"report.png: {res.png_path}", markup=False, soft_wrap=True)
