"""RMS norms: one over the hidden size (residual stream) and one per head (mixer outputs)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lsp.layers.context import ParallelContext, head_parameter, replicated_parameter

__all__ = ["RMSNorm", "HeadRMSNorm", "rms_norm"]


def _ones(shape, gen):
    return torch.ones(shape, dtype=torch.float64)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, computed in float32 or wider."""
    dtype = x.dtype
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight).to(dtype)


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
