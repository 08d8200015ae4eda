"""Tiny real image folders and a tiny profile for end-to-end fault tests through the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch

from sslctl import checkpoint

ROOT = Path(__file__).resolve().parents[1]

TINY_PROFILE = """
description: "tiny fault-test profile"
model: {arch: resnet18, small_stem: true, sync_bn: false, proj_hidden: 64, proj_dim: 32, pred_hidden: 64}
method: {name: triplet, multires: true, online_res_min: 12, online_res_max: 16, target_res_min: 14, target_res_max: 16}
optim: {name: lars, lr: 0.5, warmup_epochs: 1}
train: {epochs: 3, batch_size: 12, accumulate: 1, precision: fp32, seed: 0, log_every: 1}
data: {backend: torchvision, image_size: 16, workers: 0, pin_memory: false}
ckpt: {every_epochs: 1, keep_last: 2, every_steps: 1}
"""


def write_profile(path: Path, extra: str = "") -> Path:
    path.write_text(TINY_PROFILE + extra)
    return path


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sslctl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.fault_worker", *args]


def run_cli(
    *args: str, timeout: int = 600, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        sslctl_cmd(*args),
        cwd=ROOT,
        env={**env(), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def torchrun_cmd(*args: str, nproc: int = 2, restarts: int | None = None) -> list[str]:
    """``torchrun --standalone`` of ``tests.fault_worker ARGS…`` on ``nproc`` processes
    (``restarts``: torchrun's ``--max-restarts``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc)]
    cmd += ["--max-restarts", str(restarts)] if restarts is not None else []
    return [*cmd, "-m", "tests.fault_worker", *args]


class ForkServer:
    """One ``tests.fault_worker --fork-server`` process: each ``start`` runs an sslctl command
    in a child forked from it, without a cold interpreter start (``import torch``) each time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fault_worker", "--fork-server"],
            cwd=ROOT,
            env=env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.child: Forked | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("")  # the server ended

    def _next(self, timeout: float) -> str:
        line = self.lines.get(timeout=timeout)
        assert line, "the fork server ended"
        return line

    def start(self, *args: str, log: Path | None = None) -> Forked:
        """``sslctl ARGS…`` in a child; its stdout and stderr go to ``log`` (else nowhere)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([list(args), str(log) if log else None]) + "\n")
        self.proc.stdin.flush()
        kind, pid = self._next(600).split()
        assert kind == "pid", kind
        self.child = Forked(self, int(pid))
        return self.child

    def close(self) -> None:
        """Ends a child still running (a failed test's), then the server."""
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait(60)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Forked:
    """A child of a ``ForkServer``: ``poll``/``wait``/``kill`` as on a ``subprocess.Popen``."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(queue.Empty):
                self._ended(self.server.lines.get_nowait())
        return self.returncode

    def wait(self, timeout: float = 600) -> int:
        if self.returncode is None:
            self._ended(self.server._next(timeout))
        assert self.returncode is not None
        return self.returncode

    def _ended(self, line: str) -> None:
        assert line, "the fork server ended"
        kind, code = line.split()
        assert kind == "exit", kind
        self.returncode = int(code)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            # the server may have reaped it a moment ago (its "exit" line not read yet)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_safetensors(checkpoint.resolve(run).weights)[0]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
