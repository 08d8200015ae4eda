"""Run under torchrun by tests/test_ddp.py: rank 0 works longer than the collective timeout
(SSLCTL_DIST_TIMEOUT_S) before the long-wait barrier, as a first data-set scan does."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sslctl import dist


def main() -> None:
    out, work_s = Path(sys.argv[1]), float(sys.argv[2])
    di = dist.init("cpu")
    if di.rank == 0:
        time.sleep(work_s)
    dist.barrier_long()
    (out / f"rank{di.rank}.ok").write_text("passed the barrier")
    dist.shutdown()


if __name__ == "__main__":
    main()
