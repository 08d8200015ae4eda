"""The ``sslctl`` Typer application: one module per subcommand, registered explicitly here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sslctl",
    help="Self-supervised visual pre-training (Triplet, BYOL) and its standard evaluations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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

app.command("pretrain", help=_pretrain.HELP)(_pretrain.command)
app.command("profiles", help=_profiles.HELP)(_profiles.command)
app.command("checkpoints", help=_checkpoints.HELP)(_checkpoints.command)
app.command("extract", help=_extract.HELP)(_extract.command)
app.command("convert-detectron", help=_convert_detectron.HELP)(_convert_detectron.command)
app.command("eval-reid", help=_eval_reid.HELP)(_eval_reid.command)
app.add_typer(_data_check.app, name="data")
app.command("linear-eval", help=_linear_eval.HELP)(_linear_eval.command)
app.command("knn-eval", help=_knn_eval.HELP)(_knn_eval.command)


def main() -> None:
    app()
