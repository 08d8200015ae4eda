"""`python -m tests.fault_worker ARGS…` = `sslctl ARGS…`, with optional injected faults for tests.

Every rank prints where it stopped. SSLCTL_TEST_CRASH_AT=STEP:RANK:MARKER makes that rank die
(os._exit(1)) right after optimizer step STEP, once, through the engine's ``FitRequest.on_step``
hook: the marker file records that the crash happened, so the restarted run is clean.

`python -m tests.fault_worker --fork-server` pays the interpreter's start (``import torch``) once,
then runs one command per line of stdin (JSON: argv, log path) in a forked child: it prints
``pid N`` when the child starts and ``exit CODE`` (minus the signal if killed) when it ends.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def _crash_hook(spec: str) -> Callable[[int], None] | None:
    step_s, rank_s, marker_s = spec.split(":", 2)
    step, rank, marker = int(step_s), int(rank_s), Path(marker_s)
    if marker.exists() or int(os.environ.get("RANK", "0")) != rank:
        return None

    def on_step(done: int) -> None:
        if done == step:
            marker.write_text("crashed")
            os._exit(1)

    return on_step


def _hook_fit(on_step: Callable[[int], None] | None) -> None:
    """The CLI's pre-training runs ``fit`` with ``on_step`` set, and each rank reports its stop
    (the CLI itself prints on rank 0 only)."""
    from sslctl import dist
    from sslctl.engine.fit import FitRequest, FitResult

    pretrain = importlib.import_module("sslctl.api.pretrain")  # the module, not api.pretrain()
    real = pretrain.fit

    def fit(req: FitRequest, di: dist.DistInfo) -> FitResult:
        res = real(dataclasses.replace(req, on_step=on_step), di)
        print(f"[rank{di.rank}] stopped at step {res.step}: {res.stopped}", flush=True)
        return res

    pretrain.fit = fit


def _serve() -> None:
    from sslctl.cli.app import main as cli_main

    for slow in (
        "torch",
        "torchvision",
        "sslctl.api",
        "sslctl.data.tv",
    ):  # paid once, not per child
        importlib.import_module(slow)

    for line in sys.stdin:
        argv, log_path = json.loads(line)
        pid = os.fork()
        if pid == 0:
            out = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            for fd in (1, 2):
                os.dup2(out, fd)
            code = 1
            try:
                sys.argv = ["sslctl", *argv]
                cli_main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


def main() -> None:
    if sys.argv[1:] == ["--fork-server"]:
        _hook_fit(None)
        _serve()
        return
    spec = os.environ.get("SSLCTL_TEST_CRASH_AT")
    _hook_fit(_crash_hook(spec) if spec else None)
    from sslctl.cli.app import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
