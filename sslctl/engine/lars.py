"""LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks").

Variant: the one of the reference implementation (OpenSelfSup's mmcv-style LARS), which scales
the learning rate by the layer's trust ratio and applies momentum *after* scaling. For one
parameter tensor w with gradient g, group learning rate lr, momentum μ, weight decay wd and
trust coefficient η:

    trust = η·‖w‖ / (‖g‖ + wd·‖w‖ + eps)     (1 when ‖w‖ = 0 or ‖g‖ = 0)
    v     ← μ·v + lr·trust·(g + wd·w)
    w     ← w − v

The denominator ‖g‖ + wd·‖w‖ is the reference's (the triangle-inequality bound of
‖g + wd·w‖ from the LARS paper), not the norm of the decayed gradient; with wd = 1e-6 the two
differ by less than one part in 10⁵. Groups flagged ``lars_exclude`` (SPEC §1: BN weights and
biases, all biases; :func:`param_groups_lars` builds them) get trust = 1 and no weight decay:
plain SGD with momentum, v ← μ·v + lr·g.

``step()`` never reads a value back to the host: norms come from ``torch._foreach_norm``, the
trust ratios are one ``torch.where`` over the stacked norms and stay on the device as 0-d
tensors, and every update is an in-place ``torch._foreach_*`` call (no per-step allocation
of update tensors). The group ``lr`` is a Python float, set per step from the schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """LARS with per-group ``lars_exclude``. Parameters whose ``.grad`` is None are skipped.

    Works with ``torch.amp.GradScaler`` (``scaler.step(opt)`` unscales the grads, then calls
    ``step()`` only when they are finite). ``step()`` leaves ``.grad`` untouched.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coef: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0 or trust_coef <= 0 or eps < 0:
            raise ValueError(
                f"invalid LARS settings: lr={lr}, momentum={momentum}, "
                f"weight_decay={weight_decay}, trust_coef={trust_coef}, eps={eps}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coef": trust_coef,
            "eps": eps,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                buckets.setdefault((p.device, p.dtype), []).append(p)
            # One bucket per device/dtype: the stacked norms must share both.
            for params in buckets.values():
                self._step_bucket(group, params)
        return loss

    def _step_bucket(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        # Everything accumulates in place (momentum buffers or the weights themselves): a
        # fresh update tensor per parameter would cost a full allocation of the model per step.
        grads = cast(list[torch.Tensor], [p.grad for p in params])
        lr, mu = group["lr"], group["momentum"]
        if group["lars_exclude"]:
            # plain SGD with momentum: no trust ratio, no weight decay
            if mu == 0:
                torch._foreach_add_(params, grads, alpha=-lr)
                return
            bufs = self._momentum_buffers(params)
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads, alpha=lr)
            torch._foreach_sub_(params, bufs)
            return
        wd = group["weight_decay"]
        step = _trust_ratios(group, params, grads) * lr  # per-tensor step sizes, 0-d, on device
        if mu == 0:
            # w ← w·(1 − s·wd) − s·g, both terms from the old w
            if wd:
                torch._foreach_mul_(params, list((1.0 - wd * step).unbind(0)))
            torch._foreach_addcmul_(params, grads, list((-step).unbind(0)))
            return
        bufs = self._momentum_buffers(params)
        torch._foreach_mul_(bufs, mu)
        torch._foreach_addcmul_(bufs, grads, list(step.unbind(0)))
        if wd:
            torch._foreach_addcmul_(bufs, params, list((wd * step).unbind(0)))
        torch._foreach_sub_(params, bufs)

    def _momentum_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return bufs


def _trust_ratios(
    group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
) -> torch.Tensor:
    """η·‖w‖ / (‖g‖ + wd·‖w‖ + eps) per tensor (1 where a norm is 0), one 1-D device tensor."""
    wd, eta, eps = group["weight_decay"], group["trust_coef"], group["eps"]
    w_norm = torch.stack(torch._foreach_norm(params))
    g_norm = torch.stack(torch._foreach_norm(grads))
    ratio = eta * w_norm / (g_norm + wd * w_norm + eps)
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def _named_parameters(
    source: nn.Module | Iterable[nn.Module] | Iterable[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    if isinstance(source, nn.Module):
        return list(source.named_parameters())
    named: list[tuple[str, torch.Tensor]] = []
    for i, item in enumerate(source):
        if isinstance(item, nn.Module):
            named.extend((f"{i}.{n}", p) for n, p in item.named_parameters())
        else:
            named.append(cast(tuple[str, torch.Tensor], item))
    return named


def param_groups_lars(
    modules_or_named_params: nn.Module | Iterable[nn.Module] | Iterable[tuple[str, torch.Tensor]],
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Split trainable parameters into a LARS group and an excluded group (SPEC §1).

    Every parameter with ndim <= 1 — biases, BatchNorm (and other norm) weights and biases —
    goes to ``{"lars_exclude": True, "weight_decay": 0.0}``; the rest to
    ``{"lars_exclude": False, "weight_decay": weight_decay}``. Frozen parameters
    (requires_grad False) are left out; a parameter shared by several modules appears once.
    Empty groups are omitted. Each group also carries ``"param_names"`` (a key torch.optim
    keeps in its state dict) for logging.
    """
    seen: set[int] = set()
    groups: dict[bool, dict[str, Any]] = {
        False: {
            "params": [],
            "param_names": [],
            "weight_decay": weight_decay,
            "lars_exclude": False,
        },
        True: {"params": [], "param_names": [], "weight_decay": 0.0, "lars_exclude": True},
    }
    for name, param in _named_parameters(modules_or_named_params):
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        group = groups[param.ndim <= 1]
        group["params"].append(param)
        group["param_names"].append(name)
    return [g for g in groups.values() if g["params"]]
