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
from sslctl.cli import pretrain as _pretrain  # noqa: E402
from sslctl.cli import profiles as _profiles  # noqa: E402

app.command("pretrain", help=_pretrain.HELP)(_pretrain.command)
app.command("profiles", help=_profiles.HELP)(_profiles.command)


def main() -> None:
    app()
