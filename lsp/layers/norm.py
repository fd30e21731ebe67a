"""RMS norms: one over the hidden size (residual stream) and one per head (mixer outputs)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lsp.layers.common import wide
from lsp.layers.context import ParallelContext, head_parameter, replicated_parameter

__all__ = ["RMSNorm", "HeadRMSNorm", "rms_norm"]


def _ones(shape, gen):
    return torch.ones(shape, dtype=torch.float64)


class _RMSNorm(torch.autograd.Function):
    """``y = x r w``, ``r = rsqrt(mean(x^2) + eps)`` over the last dim, in float32 or wider,
    returned in ``x``'s dtype. ``weight`` has the trailing shape of ``x`` (``[D]`` or ``[h, d]``).
    Saves only ``x`` and ``r``: the plain formula's autograd keeps ``x^2``, ``x r`` and float32
    copies, four activations per norm (8 GB per block at 512K tokens)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = wide(x)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return (xf * r * weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, r = ctx.saved_tensors
        xhat = wide(x) * r
        dyf = dy.to(xhat.dtype)
        dw = None
        if ctx.needs_input_grad[1]:
            lead = tuple(range(x.dim() - weight.dim()))
            dw = (dyf * xhat).sum(lead).to(weight.dtype)
        g = dyf * weight.to(xhat.dtype)
        dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, computed in float32 or wider."""
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm over the hidden size; the weight is whole on every TP rank."""

    def __init__(self, hidden_size: int, ctx: ParallelContext | None = None, eps: float = 1e-5):
        super().__init__()
        ctx = ctx or ParallelContext()
        self.eps = eps
        self.weight = replicated_parameter((hidden_size,), ctx, _ones)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's channels with a per-head weight ``[H, d]`` (split with the heads
    over TP), optionally gated: ``norm(o) * w * silu(gate)`` (fla's ``FusedRMSNormGated``).

    Input ``[..., h, d]`` where ``h`` is this rank's head count.
    """

    def __init__(self, num_heads: int, head_dim: int, ctx: ParallelContext | None = None,
                 eps: float = 1e-5, gated: bool = False):
        super().__init__()
        ctx = ctx or ParallelContext()
        self.eps, self.gated = eps, gated
        self.weight = head_parameter((num_heads, head_dim), ctx, _ones)

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        y = rms_norm(x, self.weight, self.eps)
        if self.gated:
            if gate is None:
                raise ValueError("HeadRMSNorm(gated=True) needs the gate tensor")
            y = y * F.silu(gate)
        return y
