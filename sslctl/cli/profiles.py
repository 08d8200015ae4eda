"""``sslctl profiles``: list the bundled profiles with their one-line descriptions."""

from __future__ import annotations

from rich.table import Table

from sslctl import config
from sslctl.cli.common import out_console, user_errors

HELP = "List the bundled profiles with a one-line description each."


@user_errors
def command() -> None:
    table = Table(title="bundled profiles (sslctl pretrain --profile NAME)")
    table.add_column("profile", style="bold")
    table.add_column("description")
    for name, desc in config.list_profiles().items():
        table.add_row(name, desc)
    out_console.print(table)
