"""The only module that touches torch.distributed and the torchrun environment.

Every helper is correct in a single process (rank 0, world size 1).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from sslctl import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_device(device: str) -> str:
    """``device`` as given when it is one of auto, cpu, cuda, cuda:N and usable here, else a
    UserError naming the value and what to use instead (checked before any work is done)."""
    value = device.strip().lower()
    if value in ("auto", "cpu"):
        return value
    if value != "cuda" and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise UserError(
            f"--device {device[:40]!r} is not a device sslctl knows: use auto, cpu, cuda or cuda:N"
        )
    if not torch.cuda.is_available():
        raise UserError(
            f"--device {value}: no CUDA device is visible on this machine "
            "(torch.cuda.is_available() is False); use --device cpu or --device auto"
        )
    index = int(value[5:]) if ":" in value else 0
    if index >= torch.cuda.device_count():
        raise UserError(
            f"--device {value}: this machine shows {torch.cuda.device_count()} CUDA device(s), "
            f"numbered from 0; use --device cuda:0 … cuda:{torch.cuda.device_count() - 1}"
        )
    return value


def init(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; pick this rank's device.

    ``device`` is auto (CUDA when visible), cpu, cuda (this rank's LOCAL_RANK GPU) or cuda:N."""
    device = check_device(device)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device.startswith("cuda:") and world == 1:
        local_rank = int(device[5:])
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        # SSLCTL_DIST_TIMEOUT_S bounds every collective, and the connection set-up, in seconds.
        timeout = datetime.timedelta(seconds=float(os.environ.get("SSLCTL_DIST_TIMEOUT_S", "1800")))
        tdist.init_process_group(
            backend, store=_attempt_store(timeout), rank=rank, world_size=world, timeout=timeout
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _attempt_store(timeout: datetime.timedelta) -> tdist.Store:
    """torchrun's rendezvous store, with keys private to this restart attempt.

    torchrun (``--max-restarts``) keeps one TCP store for the whole job, so after a worker crash
    the restarted workers would find the process group's keys left by the dead attempt (e.g. a
    peer's old gloo address) and try to connect to processes that no longer exist. Prefixing
    every key with TORCHELASTIC_RESTART_COUNT gives each attempt a clean namespace.
    """
    store, _, _ = next(tdist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return tdist.PrefixStore(f"sslctl/attempt_{attempt}", store)


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Rank 0; before ``init`` under torchrun, the process torchrun made rank 0 (so that what is
    printed while starting up is printed once)."""
    if not is_dist() and launched_by_torchrun():
        return os.environ.get("RANK") == "0"
    return rank() == 0


def barrier() -> None:
    if is_dist():
        tdist.barrier()


_LONG_WAIT: dict[str, Any] = {}


def barrier_long() -> None:
    """A barrier for waits of unknown length (local rank 0 decoding a whole data set while the
    others wait): on a gloo group whose timeout is SSLCTL_LONG_WAIT_S (default 24 h), not the
    collective timeout (SSLCTL_DIST_TIMEOUT_S, 30 min) that an NCCL barrier would hit."""
    if not is_dist():
        return
    if "group" not in _LONG_WAIT:  # every rank reaches its first call together: collective
        secs = float(os.environ.get("SSLCTL_LONG_WAIT_S", str(24 * 3600)))
        _LONG_WAIT["group"] = tdist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=secs)
        )
    tdist.barrier(group=_LONG_WAIT["group"])


def shutdown() -> None:
    _LONG_WAIT.clear()
    if is_dist():
        tdist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); identity in one process."""
    if not is_dist():
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t / world_size()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    t = t.clone()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank; also a barrier. ``flag`` in one process."""
    if not is_dist():
        return flag
    on_gpu = tdist.get_backend() == "nccl"
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if on_gpu else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank its own slice of the summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(world_size())]
        tdist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = torch.stack(grads)
        tdist.all_reduce(g)
        return g[rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (n×…) from all ranks along dim 0, differentiable; x itself in one process.

    Requires the same n on every rank (drop_last guarantees it in training).
    """
    if not is_dist() or world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def gather_equal(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks in rank order (no grad) when every rank's x has the same
    shape (drop_last micro-batches): no size exchange and no host sync."""
    if not is_dist() or world_size() == 1:
        return x
    x = x.contiguous()
    if tdist.get_backend() == "nccl":
        out = torch.empty((world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        tdist.all_gather_into_tensor(out, x)
        return out
    parts = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def gather_to_main(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rank r's x (counts[r] rows) concatenated in rank order on rank 0 only; other ranks get
    an empty tensor. The counts are known to every rank (no size exchange, no host sync), and
    only rank 0 holds the whole result (a SYSU-30k gallery is ≈3.9 GB)."""
    if not is_dist() or world_size() == 1:
        return x
    m = max(counts)
    pad = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in counts] if is_main() else None
    tdist.gather(pad, parts, dst=0)
    if parts is None:
        return x.new_empty((0, *x.shape[1:]))
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0)
