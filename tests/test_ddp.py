"""Real DDP on CPU: torchrun with 2 gloo processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def torchrun(out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tests.ddp_worker", str(out), *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.ddp
@pytest.mark.parametrize(
    "sets",
    [
        ["loss.gather_negatives=false"],
        ["loss.gather_negatives=true"],
        # the baselines: SimCLR's negatives gathered with gradient, MoCo's shuffle-BN and queue
        ["method.name=simclr", "loss.gather_negatives=true"],
        ["method.name=mocov2", "method.bn_splits=4", "method.queue_size=96"],
        ["method.name=simsiam"],
    ],
    ids=["triplet", "triplet-gather", "simclr", "mocov2", "simsiam"],
)
def test_two_ranks_hold_identical_weights(tmp_path, sets):
    torchrun(tmp_path, *sets)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["step"] == r1["step"] == 3
    for k, v in r0["tensors"].items():
        if "running_" in k or "num_batches" in k:
            continue  # BN statistics are per rank without SyncBN (CPU); parameters must agree
        assert torch.allclose(v, r1["tensors"][k], atol=1e-6), k
    # only rank 0 wrote checkpoints, and the run's metrics
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.json"))
    assert (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.ddp
def test_ranks_wait_for_a_long_scan_without_a_collective_timeout(tmp_path):
    """The DALI preflight: local rank 0 decodes every file while the other ranks wait. With the
    collective timeout at 3 s, a 6 s scan must not fail the waiting rank."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "SSLCTL_DIST_TIMEOUT_S": "3",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tests.barrier_worker", str(tmp_path), "6"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank0.ok", "rank1.ok"]
