"""Run under torchrun by tests/test_ddp.py: a few engine steps, then each rank dumps its weights."""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import torch

from sslctl import dist
from sslctl.engine.fit import FitRequest, Trainer
from tests.engine_helpers import TensorLoader, small_cfg


def main() -> None:
    faulthandler.dump_traceback_later(
        int(os.environ.get("SSLCTL_TEST_WATCHDOG", "240")), exit=True
    )  # a hang shows its stacks instead of a timeout
    out, extra = Path(sys.argv[1]), sys.argv[2:]
    di = dist.init("cpu")
    cfg = small_cfg(*extra)
    torch.manual_seed(0)
    loader = TensorLoader(96, cfg.train.batch_size, rank=di.rank, world=di.world_size)
    trainer = Trainer(FitRequest(cfg, out, loader, "none", 3), di)
    result = trainer.run()
    tensors = {k: v.detach().clone() for k, v in trainer.method.state_tensors().items()}
    torch.save({"step": result.step, "tensors": tensors}, out / f"rank{di.rank}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main()
