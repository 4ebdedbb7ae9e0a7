"""GroupNorm as split reductions: the torch backend's ``fast_group_norm`` option.

PyTorch's CUDA GroupNorm computes each (image, group)'s moments in one thread block (``RowwiseMomentsCUDAKernel``):
at batch 1 with 32 groups that is 32 blocks for a GPU of 132 streaming multiprocessors, each streaming 2M values of
the VAE decoder's 512x512x128 activations. It also needs NCHW-contiguous input, so channels-last activations are
copied in and out around it. Profiled on an H200 (``benchmarks/results/h200-2026-11-27/profile.txt``), GroupNorm
and those copies took about 19 of the eager VAE decode's 25 ms, and about 2 of the UNet's 7.

:func:`group_norm` computes the same function with PyTorch's general reductions, which split a long reduction over
many blocks in either memory format: per-channel mean and mean square (accumulated in float32 from the 16-bit
input, without an upcast copy), combined per group, then one fused multiply-add ``x * scale + shift`` (float32
math, written in the input's dtype and memory format). No custom kernel: it runs wherever PyTorch does, inside CUDA
graphs included. For inference: with autograd recording (a parameter or input that requires grad) it hands over
to ``F.group_norm``; and ``compile=True`` gains nothing from it (Inductor fuses the native GroupNorm well by itself).

Numerics: the variance comes from E[x^2] - E[x]^2 in float32, which loses digits only when a group's mean exceeds
its standard deviation by hundreds (relative error about 1e-7 (mean / std)^2); outputs match ``F.group_norm`` to
the input dtype's rounding (``tests/test_group_norm.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

#: set on a ``torch.nn.GroupNorm`` whose forward is :func:`group_norm`
MARK = "_instaflow_split_group_norm"


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` by split reductions (see the module docstring); inputs
    it does not cover (fewer than 3 dimensions, channels not divisible by the groups) go to ``F.group_norm``."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if grad or x.dim() < 3 or x.shape[1] % num_groups or x.numel() == 0:  # out= below cannot record autograd
        return F.group_norm(x, num_groups, weight, bias, eps)
    n, c = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    per_channel = x[0, 0].numel()
    acc = torch.promote_types(x.dtype, torch.float32)  # float32 for 16-bit input, float64 stays
    # per (image, channel): mean and mean square, float32 accumulation straight from 16-bit input on CUDA
    mean = x.mean(spatial, dtype=acc)
    square = torch.linalg.vector_norm(x, 2, dim=spatial, dtype=acc).square_().div_(per_channel)
    # per (image, group): channels of a group hold equally many values, so the group's moments are the means
    mean = mean.view(n, num_groups, -1).mean(-1)
    var = square.view(n, num_groups, -1).mean(-1).sub_(mean.square()).clamp_(min=0)
    rstd = torch.rsqrt(var.add_(eps))
    per_group = c // num_groups
    scale = rstd.repeat_interleave(per_group, dim=1)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    trailing = (1,) * len(spatial)
    out = torch.empty_like(x)  # the input's dtype and memory format
    return torch.addcmul(shift.view(n, c, *trailing), x, scale.view(n, c, *trailing), out=out)


def _forward(module: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return group_norm(x, module.num_groups, module.weight, module.bias, module.eps)


def use_split_group_norm(module: torch.nn.Module) -> int:
    """Make every ``torch.nn.GroupNorm`` inside ``module`` run :func:`group_norm`, in place (like channels-last:
    modules shared with another pipeline change too; the function is the same up to rounding). Returns how many
    layers changed (0 when already done)."""
    changed = 0
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm) and not getattr(m, MARK, False):
            m.forward = functools.partial(_forward, m)  # an instance attribute: nn.Module.__call__ calls it
            setattr(m, MARK, True)
            changed += 1
    return changed


def uses_split_group_norm(module: Any) -> bool:
    """Whether any GroupNorm layer of ``module`` runs :func:`group_norm`."""
    return isinstance(module, torch.nn.Module) and any(getattr(m, MARK, False) for m in module.modules())
