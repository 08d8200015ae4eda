"""LARS (foreach, sync-free) against a plain per-parameter loop, and its parameter groups."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from sslctl.engine.lars import LARS, param_groups_lars


def lars_reference_step(groups: list[dict[str, Any]], bufs: dict[int, torch.Tensor]) -> None:
    """The reference (OpenSelfSup) LARS written as the obvious loop, one parameter at a time."""
    with torch.no_grad():
        for group in groups:
            lr, mu = group["lr"], group["momentum"]
            wd, eta, eps = group["weight_decay"], group["trust_coef"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["lars_exclude"]:
                    update = lr * p.grad
                else:
                    w_norm, g_norm = p.norm().item(), p.grad.norm().item()
                    trust = 1.0
                    if w_norm > 0 and g_norm > 0:
                        trust = eta * w_norm / (g_norm + wd * w_norm + eps)
                    update = lr * trust * (p.grad + wd * p)
                buf = mu * bufs.get(id(p), torch.zeros_like(p)) + update
                bufs[id(p)] = buf
                p.sub_(buf)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(self.bn1(self.fc1(x)))


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net()


def _ref_groups(model: nn.Module, opt: LARS) -> list[dict[str, Any]]:
    """The optimizer's groups (hyper-parameters included) pointing at `model`'s parameters."""
    by_name = dict(model.named_parameters())
    return [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [by_name[n] for n in names]}
        for g, names in ((g, g["param_names"]) for g in opt.param_groups)
    ]


def _set_grads(models: list[_Net], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for params in zip(*(m.parameters() for m in models), strict=True):
        g = torch.randn(params[0].shape, generator=gen) * 0.02 * (1 + step)
        for p in params:
            p.grad = g.clone()
    # edge cases: a parameter without a gradient, and (every other step) an included one
    # with an all-zero gradient, whose trust ratio must then be 1
    for m in models:
        m.fc2.bias.grad = None
        if step % 2 == 0:
            m.fc1.weight.grad = torch.zeros_like(m.fc1.weight)


@pytest.mark.parametrize("momentum,wd", [(0.9, 1e-6), (0.9, 0.05), (0.0, 1e-3), (0.5, 0.0)])
def test_lars_matches_reference_loop_over_steps(momentum: float, wd: float) -> None:
    model = _net()
    with torch.no_grad():
        model.conv.weight[0].zero_()  # part of a tensor is zero, not the norm
        model.fc2.weight.zero_()  # zero weight norm: trust must be 1
    ref_model = copy.deepcopy(model)
    opt = LARS(param_groups_lars(model, wd), lr=0.7, momentum=momentum, trust_coef=0.02)
    ref_groups = _ref_groups(ref_model, opt)
    bufs: dict[int, torch.Tensor] = {}
    untouched = model.fc2.bias.detach().clone()
    for step in range(5):
        _set_grads([model, ref_model], step)
        opt.step()
        lars_reference_step(ref_groups, bufs)
        for (name, a), b in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{name} step {step}")
    assert torch.equal(model.fc2.bias, untouched)  # grad None -> skipped
    assert model.fc2.bias not in opt.state
    if momentum:
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            if p in opt.state:
                torch.testing.assert_close(
                    opt.state[p]["momentum_buffer"], bufs[id(q)], rtol=1e-6, atol=1e-7
                )
    assert not torch.equal(model.conv.weight, _net().conv.weight)  # it did move


def test_lars_trust_ratio_scales_step_by_layer_norm() -> None:
    # One step, no momentum: the update of an included tensor is lr·η·‖w‖/(‖g‖+wd‖w‖)·(g+wd·w)
    w = nn.Parameter(torch.full((10,), 3.0))
    b = nn.Parameter(torch.full((10,), 3.0))
    w.grad, b.grad = torch.full((10,), 0.5), torch.full((10,), 0.5)
    opt = LARS(
        [
            {"params": [w], "lars_exclude": False},
            {"params": [b], "lars_exclude": True, "weight_decay": 0.5},
        ],
        lr=2.0,
        momentum=0.0,
        weight_decay=0.1,
        trust_coef=0.01,
        eps=0.0,
    )
    opt.step()
    w_norm, g_norm = 3.0 * 10**0.5, 0.5 * 10**0.5
    trust = 0.01 * w_norm / (g_norm + 0.1 * w_norm)
    torch.testing.assert_close(w.detach(), torch.full((10,), 3.0 - 2.0 * trust * (0.5 + 0.3)))
    # excluded: plain SGD, its group's weight decay ignored (SPEC: no wd, no adaptation)
    torch.testing.assert_close(b.detach(), torch.full((10,), 3.0 - 2.0 * 0.5))


def test_lars_step_leaves_grads_untouched_and_never_syncs(monkeypatch) -> None:
    model = _net()
    opt = LARS(param_groups_lars(model, 1e-6), lr=0.3)
    _set_grads([model], 0)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    def no_sync(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("host sync inside LARS.step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    opt.step()
    opt.step()
    monkeypatch.undo()
    for p, g in zip(model.parameters(), grads, strict=True):
        if g is None:
            assert p.grad is None
        else:
            assert p.grad is not None and torch.equal(p.grad, g)


def test_lars_with_grad_scaler_matches_plain_step() -> None:
    model = _net()
    twin = copy.deepcopy(model)
    x = torch.randn(8, 3, 6, 6)
    opt = LARS(param_groups_lars(model, 1e-6), lr=0.5)
    opt_twin = LARS(param_groups_lars(twin, 1e-6), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt_twin.zero_grad()
        twin(x).square().mean().backward()
        opt_twin.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a non-finite gradient makes the scaler skip the step and halve the scale
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    grad = model.fc1.weight.grad
    assert grad is not None
    grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_lars_state_dict_resume_continues_identically() -> None:
    model = _net()
    opt = LARS(param_groups_lars(model, 1e-4), lr=0.4)
    for step in range(2):
        _set_grads([model], step)
        opt.step()
    twin = copy.deepcopy(model)
    opt_twin = LARS(param_groups_lars(twin, 1e-4), lr=0.4)
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(2, 4):
        _set_grads([model, twin], step)
        opt.step()
        opt_twin.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lars_mixed_dtypes_in_one_group() -> None:
    a = nn.Parameter(torch.randn(5, 4))
    b = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    refs = [nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())]
    opt = LARS([a, b], lr=1.0, weight_decay=1e-3)
    ref_groups = [{**{k: v for k, v in opt.param_groups[0].items() if k != "params"}}]
    ref_groups[0]["params"] = refs
    bufs: dict[int, torch.Tensor] = {}
    for step in range(3):
        for p, r in zip((a, b), refs, strict=True):
            p.grad = torch.randn_like(p) * (step + 1)
            r.grad = p.grad.clone()
        opt.step()
        lars_reference_step(ref_groups, bufs)
    torch.testing.assert_close(a.detach(), refs[0].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), refs[1].detach(), rtol=1e-12, atol=1e-14)


def test_param_groups_lars_split() -> None:
    model = _net()
    model.conv.weight.requires_grad_(False)
    groups = param_groups_lars(model, 1e-6)
    assert [g["lars_exclude"] for g in groups] == [False, True]
    assert groups[0]["weight_decay"] == 1e-6 and groups[1]["weight_decay"] == 0.0
    assert groups[0]["param_names"] == ["fc1.weight", "fc2.weight"]
    assert groups[1]["param_names"] == [
        "bn.weight",
        "bn.bias",
        "fc1.bias",
        "bn1.weight",
        "bn1.bias",
        "fc2.bias",
    ]
    assert all(p.ndim <= 1 for p in groups[1]["params"])
    # a list of modules sharing a parameter, and (name, param) pairs, are accepted
    shared = nn.Linear(3, 3)
    twice = param_groups_lars([shared, nn.Sequential(shared, nn.BatchNorm1d(3))], 0.1)
    assert sum(len(g["params"]) for g in twice) == 4  # weight, bias, bn weight, bn bias
    named = param_groups_lars(list(shared.named_parameters()), 0.1)
    assert [g["param_names"] for g in named] == [["weight"], ["bias"]]
    only_bias = param_groups_lars([("b", nn.Parameter(torch.zeros(2)))], 0.1)
    assert len(only_bias) == 1 and only_bias[0]["lars_exclude"]


def test_lars_rejects_bad_settings() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    for kw in ({"lr": -1.0}, {"lr": 1.0, "momentum": 1.0}, {"lr": 1.0, "trust_coef": 0.0}):
        with pytest.raises(ValueError):
            LARS(p, **kw)
