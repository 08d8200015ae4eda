"""Re-launch the current command under torchrun: ``--nproc-per-node N`` without typing torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

from sslctl import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # as sslctl.engine.preempt

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
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE ARGV…``.

    ``--standalone`` picks a free rendezvous port on this host, so two runs on one machine do
    not collide.
    """
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), "-m", module, *strip_nproc_flag(argv),
    ]  # fmt: skip


def relaunch_with_torchrun(nproc: int, argv: list[str], module: str = "sslctl") -> int:
    """Run ``python -m MODULE argv`` (flag removed) in nproc torchrun processes; the exit code.

    ``argv`` is the command line after the program name (``sys.argv[1:]``). Refused inside a
    torchrun worker, where re-launching would multiply the processes.
    """
    if nproc < 1:
        raise UserError(f"{FLAG} must be ≥ 1, got {nproc}")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise UserError(f"{FLAG} given inside a torchrun worker: drop the flag or the torchrun")
    # torchrun runs in its own session and every stop signal this process gets is passed on
    # once: a SIGTERM to the whole process group (Slurm, `timeout`) or a Ctrl-C reaches torchrun
    # exactly once, which forwards it to the workers, which checkpoint before they exit.
    proc = subprocess.Popen(torchrun_command(nproc, argv, module), start_new_session=True)
    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            old[sig] = signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    finally:
        for num, handler in old.items():
            signal.signal(num, handler)
