"""``sslctl profiles``: list the bundled profiles with their kind and one-line descriptions;
``sslctl profiles show NAME [--set k=v]``: print one profile resolved, as YAML."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from sslctl import UserError, config
from sslctl.cli.common import out_console, set_option, user_errors

HELP = (
    "List the bundled profiles: kind (pretrain: `sslctl pretrain --profile NAME`; linear-eval: "
    "`sslctl linear-eval/knn-eval --profile NAME`) and a one-line description each. "
    "`sslctl profiles show NAME [--set k=v]` prints a profile (bundled name or YAML file) "
    "resolved, with its `extends:` chain and --set applied, as YAML."
)


@user_errors
def command(
    action: Annotated[
        str | None,
        typer.Argument(
            metavar="ACTION",
            help="show (print profile NAME resolved, as YAML); none: list the bundled profiles",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Argument(metavar="NAME", help="bundled profile name or YAML file (for show)"),
    ] = None,
    set_: Annotated[
        list[str] | None,
        set_option("with show: override a key, --set optim.lr=2.4 (repeatable)"),
    ] = None,
) -> None:
    if action is None:
        if set_:
            raise UserError("--set applies to `sslctl profiles show NAME --set section.key=value`")
        _table()
    elif action != "show":
        raise UserError(
            f"unknown action {action[:40]!r}: `sslctl profiles` lists the bundled "
            "profiles, `sslctl profiles show NAME` prints one resolved"
        )
    elif name is None:
        raise UserError("`sslctl profiles show` needs a profile: sslctl profiles show NAME")
    else:
        # plain print: Rich markup would take a `[...]` in a value for a style
        print(config.to_yaml(config.load_any(name, set_ or [])), end="")


def _table() -> None:
    table = Table(title="bundled profiles (--profile NAME)")
    table.add_column("profile", style="bold")
    table.add_column("kind")
    table.add_column("description")
    for name, (kind, desc) in config.profile_table().items():
        table.add_row(name, kind, desc)
    out_console.print(table)
