"""The ``sslctl`` Typer application: one module per subcommand, registered explicitly here."""

from __future__ import annotations

from typing import Annotated

import typer

from sslctl import __version__

app = typer.Typer(
    name="sslctl",
    help="Self-supervised visual pre-training (Triplet, BYOL) and its standard evaluations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is shown as written ("[label]" stays)
)

# Subcommands (explicit, no registry). Each module defines `command`.
from sslctl.cli import checkpoints as _checkpoints  # noqa: E402
from sslctl.cli import convert_detectron as _convert_detectron  # noqa: E402
from sslctl.cli import data_check as _data_check  # noqa: E402
from sslctl.cli import eval_reid as _eval_reid  # noqa: E402
from sslctl.cli import extract as _extract  # noqa: E402
from sslctl.cli import knn_eval as _knn_eval  # noqa: E402
from sslctl.cli import linear_eval as _linear_eval  # noqa: E402
from sslctl.cli import pretrain as _pretrain  # noqa: E402
from sslctl.cli import profiles as _profiles  # noqa: E402
from sslctl.cli import report as _report  # noqa: E402

# Examples for each command, shown under its --help.
EXAMPLES = {
    "pretrain": [
        "sslctl pretrain --profile demo-cpu --out runs/demo",
        "sslctl pretrain --profile r50-3090x8 --data /data/imagenet/train --out runs/r50 "
        "--nproc-per-node 8",
    ],
    "profiles": ["sslctl profiles", "sslctl profiles show r50-3090x8 --set train.epochs=300"],
    "checkpoints": ["sslctl checkpoints runs/demo"],
    "extract": [
        "sslctl extract runs/demo -o backbone.safetensors",
        "sslctl extract runs/r50 --part target -o r50.pth   (a torchvision .pth, from the suffix)",
    ],
    "convert-detectron": ["sslctl convert-detectron runs/r50 -o r50.pkl --configs d2-configs"],
    "eval-reid": ["sslctl eval-reid runs/r50 --data /data/Market-1501 --out reid-market"],
    "linear-eval": [
        "sslctl linear-eval runs/demo --data bundled --protocol cached --compare-random "
        "--out runs/demo-eval",
        "sslctl linear-eval runs/r50 --data /data/imagenet --profile linear-r50 --out runs/lin "
        "--nproc-per-node 8",
    ],
    "knn-eval": ["sslctl knn-eval runs/demo --data bundled --out runs/demo-knn"],
    "report": [
        "sslctl report runs/demo --eval runs/demo-eval   (writes runs/demo/report/report.png)",
        "sslctl report runs/r50 runs/byol -o reports/r50-vs-byol",
    ],
}


def _print_version(value: bool) -> None:
    if value:
        print(f"sslctl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="print the version and exit", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    del version  # acted on eagerly by _print_version, before any command


def _register(name: str, module: object) -> None:
    lines = "\n".join(f"  {e}" for e in EXAMPLES[name])
    app.command(
        name,
        help=module.HELP,  # type: ignore[attr-defined]
        epilog=f"\b\nExamples:\n{lines}",  # \b: Click keeps these lines as written
    )(module.command)  # type: ignore[attr-defined]


_register("pretrain", _pretrain)
_register("profiles", _profiles)
_register("checkpoints", _checkpoints)
_register("extract", _extract)
_register("convert-detectron", _convert_detectron)
_register("eval-reid", _eval_reid)
app.add_typer(_data_check.app, name="data")
_register("linear-eval", _linear_eval)
_register("knn-eval", _knn_eval)
_register("report", _report)


def main() -> None:
    app()
