"""Mixed precision for both trainers: the autocast dtypes, and the check that a step's
gradients are finite (GradScaler's own overflow flag under fp16, the gradient norms otherwise)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def found_inf(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> torch.Tensor | None:
    """GradScaler's inf flag for ``opt`` after ``unscale_`` (a device scalar), or None when this
    torch keeps it elsewhere (then ``GradScaler.step`` decides, at the cost of its host sync)."""
    try:
        found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    except (AttributeError, KeyError, TypeError):
        return None
    if not found:
        return None
    return sum(v.reshape(()) for v in found.values())  # one entry: this process's one device


def nonfinite_grads(
    scaler: torch.amp.GradScaler,
    opt: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    device: torch.device,
) -> tuple[torch.Tensor, bool]:
    """(1 when a gradient of this step is not finite, as a device scalar — no host sync;
    whether that is GradScaler's own overflow flag, i.e. known to the fp16 step).

    fp16: unscale now (the caller remembers it did) and take GradScaler's own inf flag (an
    overflow there is routine: the step is skipped and the scale lowered). bf16/fp32 have no
    scaler, so a finite loss with non-finite gradients would reach LARS, whose trust ratio then
    falls back to 1 and writes NaN weights: check the gradient norms.
    """
    if scaler.is_enabled():
        scaler.unscale_(opt)
        found = found_inf(scaler, opt)
        if found is None:
            return torch.zeros((), device=device), False
        return found.to(device), True
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device), False
    total = torch.stack(torch._foreach_norm(grads)).sum()
    return (~torch.isfinite(total)).float(), False
