"""Re-launch the current command under torchrun: ``--nproc-per-node N`` without typing torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

from sslctl import UserError

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
    try:
        return subprocess.run(torchrun_command(nproc, argv, module), check=False).returncode
    except KeyboardInterrupt:  # torchrun forwards the signal to its workers and exits
        return 130
