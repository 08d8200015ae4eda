"""The ``sslctl`` program (console script and ``python -m sslctl``): Ctrl-C before a command runs.

Importing the CLI (Typer, Rich, torch) takes a second or more. A Ctrl-C in that time would
print a KeyboardInterrupt traceback from deep inside an import; here it prints one line,
``received SIGINT: stopped``, and exits 130 (nothing has been written yet, so nothing needs
cleaning up). Each command calls ``command_started()`` as it begins (``user_errors`` does): from
then on Ctrl-C raises KeyboardInterrupt as usual, which ``user_errors`` reports with the same
line, and training handles SIGINT itself (it checkpoints first). This module imports nothing
heavy, so that the handler is in place within milliseconds of the interpreter starting.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STOPPED_MESSAGE = "received SIGINT: stopped"
EXIT_INTERRUPTED = 130


def _stop_before_command(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C now changes nothing
    try:
        os.write(2, (STOPPED_MESSAGE + "\n").encode())  # unbuffered: safe inside any write
    finally:
        os._exit(EXIT_INTERRUPTED)


def command_started() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt (when ``main`` installed its handler)."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is _stop_before_command
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _stop_before_command)
    from sslctl.cli.app import main as cli_main

    cli_main()
