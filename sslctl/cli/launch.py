"""Re-launch the current command under torchrun: ``--nproc-per-node N`` without typing torchrun.

``relaunch_if_asked`` is what a command calls first: every command with ``--nproc-per-node``
goes through it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import typer

from sslctl import STOP_SIGNALS, UserError
from sslctl.cli.common import EXIT_PREEMPTED

FLAG = "--nproc-per-node"


def strip_nproc_flag(argv: list[str]) -> list[str]:
    """argv without ``--nproc-per-node N`` / ``--nproc-per-node=N`` (every occurrence)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == FLAG:
            skip = True  # drop the flag and its value
        elif not a.startswith(FLAG + "="):
            out.append(a)
    return out


def torchrun_command(nproc: int, argv: list[str], module: str = "sslctl") -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N [stop flags] -m MODULE
    ARGV…``.

    ``--standalone`` picks a free rendezvous port on this host, so two runs on one machine do
    not collide. The stop flags make torchrun pass SIGUSR1 (Slurm's early warning) on to the
    workers like SIGTERM, and, where this torch has the flag, give them 240 s to checkpoint
    before it kills them (torchrun's default is 30 s).
    """
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), *_stop_flags(), "-m", module, *strip_nproc_flag(argv),
    ]  # fmt: skip


def _stop_flags() -> list[str]:
    from torch.distributed.run import get_args_parser

    known = {o for a in get_args_parser()._actions for o in a.option_strings}
    flags = []
    if "--signals-to-handle" in known:
        flags += ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
    if "--shutdown-timeout" in known:  # torch ≥ 2.12
        flags += ["--shutdown-timeout", "240"]
    return flags


def relaunch_if_asked(nproc: int, device: str | None = None, argv: list[str] | None = None) -> None:
    """With ``--nproc-per-node N`` (N > 0), run this command again in N torchrun processes and
    exit with their exit code (typer.Exit); with 0, return and let the command run here.

    ``device``: checked first, so that a wrong --device is one line here, not one per process.
    ``argv``: the command line to re-launch (default ``sys.argv[1:]``)."""
    if nproc <= 0:
        return
    if device is not None:
        from sslctl.dist import check_device

        check_device(device)
    raise typer.Exit(relaunch_with_torchrun(nproc, sys.argv[1:] if argv is None else argv))


def relaunch_with_torchrun(nproc: int, argv: list[str], module: str = "sslctl") -> int:
    """Run ``python -m MODULE argv`` (flag removed) in nproc torchrun processes; the exit code.

    ``argv`` is the command line after the program name (``sys.argv[1:]``). Refused inside a
    torchrun worker, where re-launching would multiply the processes. torchrun runs in its own
    session and every stop signal this process gets is passed on once: a SIGTERM to the whole
    process group (Slurm, `timeout`) or a Ctrl-C reaches torchrun exactly once, which forwards
    it to the workers, which checkpoint before they exit. torchrun then exits 1; when the run
    directory's status.json says the run stopped on the signal, the exit code is 3, as without
    ``--nproc-per-node``.
    """
    if nproc < 1:
        raise UserError(f"{FLAG} must be ≥ 1, got {nproc}")
    from sslctl.dist import launched_by_torchrun  # torch: only when launching

    if launched_by_torchrun():
        raise UserError(f"{FLAG} given inside a torchrun worker: drop the flag or the torchrun")
    proc = subprocess.Popen(torchrun_command(nproc, argv, module), start_new_session=True)
    got: list[int] = []

    def forward(signum: int, frame: object) -> None:
        got.append(signum)
        proc.send_signal(signum)

    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            old[sig] = signal.signal(sig, forward)
    try:
        code = proc.wait()
    finally:
        for num, handler in old.items():
            signal.signal(num, handler)
    if got and code != 0 and _stopped_on_signal(argv):
        return EXIT_PREEMPTED
    return code


def _stopped_on_signal(argv: list[str]) -> bool:
    """Whether ``--out``'s status.json (pretrain's run directory) says "signal"."""
    out = None
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            out = argv[i + 1]
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
    try:
        status = json.loads((Path(out) / "status.json").read_text()) if out else {}
    except (OSError, ValueError):
        return False
    return isinstance(status, dict) and status.get("stopped") == "signal"
