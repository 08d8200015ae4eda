"""``--help`` is fast (no torch import), shows an example for every command, plain metavars,
and help text exactly as written (Rich markup off: "[label]" is not swallowed)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.fault_helpers import env

COMMANDS = [
    ["pretrain"],
    ["profiles"],
    ["checkpoints"],
    ["extract"],
    ["convert-detectron"],
    ["eval-reid"],
    ["data", "check"],
    ["linear-eval"],
    ["knn-eval"],
    ["report"],
]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sslctl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env(), "COLUMNS": "200"},
    )


def test_cli_modules_import_no_torch():
    code = (
        "import sys, sslctl.cli.app, sslctl.entry\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", "the CLI imports torch before a command runs: " + r.stdout


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: "-".join(c))
def test_help_has_an_example_and_plain_metavars(cmd):
    r = _run(*cmd, "--help")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "Examples:" in text and "sslctl " + cmd[0] in text.split("Examples:")[1]
    # options show a metavar (N, DIR, KEY=VALUE …), not Typer's type labels (<bool>,
    # <list[str]>, <int> …); flags are bare
    options = "\n".join(ln for ln in text.splitlines() if ln.strip().startswith("-"))
    assert not re.search(r"<(bool|str|int|float|path|list\[[a-z]+\])>", options), options
    assert "[default: no-" not in text, text  # a flag that is off by default is just --flag
    assert "SPEC" not in text and "DESIGN.md" not in text and "REID.md" not in text


def test_brackets_in_help_are_shown_as_written():
    assert "'relative/path [label]'" in _run("data", "check", "--help").stdout


def test_top_level_help_lists_every_command():
    r = _run("--help")
    assert r.returncode == 0
    listed = {ln.split()[0] for ln in r.stdout.split("Commands:")[1].splitlines() if ln.strip()}
    assert listed == {cmd[0] for cmd in COMMANDS}
