"""``sslctl profiles``: list the bundled profiles with their kind and one-line descriptions."""

from __future__ import annotations

from rich.table import Table

from sslctl import config
from sslctl.cli.common import out_console, user_errors

HELP = (
    "List the bundled profiles: kind (pretrain: `sslctl pretrain --profile NAME`; linear-eval: "
    "`sslctl linear-eval/knn-eval --profile NAME`) and a one-line description each."
)


@user_errors
def command() -> None:
    table = Table(title="bundled profiles (--profile NAME)")
    table.add_column("profile", style="bold")
    table.add_column("kind")
    table.add_column("description")
    for name, (kind, desc) in config.profile_table().items():
        table.add_row(name, kind, desc)
    out_console.print(table)
