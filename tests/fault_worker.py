"""`python -m tests.fault_worker ARGS…` = `sslctl ARGS…`, with optional injected faults for tests.

SSLCTL_TEST_CRASH_AT=STEP:RANK:MARKER makes that rank die (os._exit(1)) right after optimizer
step STEP, once: the marker file records that the crash happened, so the restarted run is clean.
"""

from __future__ import annotations

import os
from pathlib import Path


def _inject_crash(spec: str) -> None:
    step_s, rank_s, marker_s = spec.split(":", 2)
    step, rank, marker = int(step_s), int(rank_s), Path(marker_s)
    if marker.exists() or int(os.environ.get("RANK", "0")) != rank:
        return
    from sslctl.engine import fit

    real = fit.Trainer.optimizer_step

    def crashing(self: fit.Trainer, finite: bool) -> None:
        real(self, finite)
        if self.pos.step == step:
            marker.write_text("crashed")
            os._exit(1)

    fit.Trainer.optimizer_step = crashing  # type: ignore[method-assign]


def _report_stops() -> None:
    """Each rank prints where it stopped (the CLI itself prints on rank 0 only)."""
    from sslctl.engine import fit

    real = fit.Trainer.run

    def reporting(self: fit.Trainer) -> fit.FitResult:
        res = real(self)
        print(f"[rank{self.di.rank}] stopped at step {res.step}: {res.stopped}", flush=True)
        return res

    fit.Trainer.run = reporting  # type: ignore[method-assign]


def main() -> None:
    _report_stops()
    spec = os.environ.get("SSLCTL_TEST_CRASH_AT")
    if spec:
        _inject_crash(spec)
    from sslctl.cli.app import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
