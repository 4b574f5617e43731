"""The ``batched`` implementation's forward: T tasks' own parameters through linear layers as
batched matrix products, without ``torch.func.vmap``.

vmap runs any module on a task axis, but on a model as small as the sinusoid MLP (10 points, 40
units) its per-operator batching costs more than the arithmetic, and it doubles with every order of
differentiation. A linear layer with per-task weights [T, out, in] is one ``baddbmm``; with weights
shared by all tasks, one ``linear`` over [T, N, in]. This is the hand-batched loop a user would
write for an MLP, with the same autograd graph. Only layers an MLP is made of are known here:
``supports`` says whether a module consists of them, and anything else (convolutions, BatchNorm)
keeps vmap.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ELEMENTWISE = {nn.ReLU: torch.relu, nn.Tanh: torch.tanh, nn.Identity: lambda x: x}


@functools.cache  # asked on every forward of the batched implementation; a module's structure is fixed
def supports(module: nn.Module) -> bool:
    """Whether ``forward`` can run ``module``: linear layers, element-wise activations, and
    containers whose forward applies their children in order (``nn.Sequential``, or a model class
    that says so with ``children_in_order = True``)."""
    if isinstance(module, nn.Linear) or type(module) in ELEMENTWISE:
        return True
    in_order = isinstance(module, nn.Sequential) or getattr(type(module), "children_in_order", False)
    return in_order and all(supports(child) for child in module.children())


def forward(module: nn.Module, params: dict[str, Tensor], x: Tensor, shared: bool = False, prefix: str = "") -> Tensor:
    """``module`` on x [T, N, features] with task t's parameters ``params[name][t]`` (or, with
    ``shared``, the same [...] parameters for every task) -> [T, N, outputs]."""
    if isinstance(module, nn.Linear):
        weight, bias = params[prefix + "weight"], params.get(prefix + "bias")
        if shared:
            return F.linear(x, weight, bias)
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    if type(module) in ELEMENTWISE:
        return ELEMENTWISE[type(module)](x)
    for name, child in module.named_children():
        x = forward(child, params, x, shared, f"{prefix}{name}.")
    return x
