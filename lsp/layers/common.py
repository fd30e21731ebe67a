"""Small shape and activation helpers shared by the token mixers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["split_heads", "merge_heads", "l2norm", "feature_map", "wide"]


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """``[B, T, h*d] -> [B, T, h, d]``."""
    return x.unflatten(-1, (-1, head_dim))


def merge_heads(o: Tensor) -> Tensor:
    """``[B, T, h, d] -> [T, B, h*d]`` (contiguous, for a row-parallel output projection).

    At ``B = 1`` a transpose keeps a size-1 dim with stride ``T*h*d``: torch calls that
    contiguous (``.contiguous()`` copies nothing), but ``torch.matmul`` in megatron's linear then
    does not fold ``[T, 1, K] @ [K, N]`` into one GEMM and runs a batched product of ``T``
    single rows instead, many times slower than the one GEMM. A reshape gives canonical
    strides.
    """
    B, T = o.shape[:2]
    if B == 1:
        return o.reshape(T, 1, -1)
    return o.flatten(-2).transpose(0, 1).contiguous()


def wide(x: Tensor) -> Tensor:
    """``x`` in float32 when it is half precision (gates and router scores), else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _L2Norm(torch.autograd.Function):
    """``y = x r``, ``r = rsqrt(sum(x^2) + eps)`` over the last dim, computed in float32 (or wider)
    and returned in ``x``'s dtype; saves only ``x`` and ``r`` (the autograd of the plain formula
    under CUDA autocast keeps two float32 copies of ``x``)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        xf = wide(x)
        r = torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, r)
        return (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, r = ctx.saved_tensors
        y = wide(x) * r
        dyf = wide(dy)
        dx = r * (dyf - y * (dyf * y).sum(-1, keepdim=True))
        return dx.to(x.dtype), None


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (fla's ``l2norm``), in ``x``'s dtype."""
    return _L2Norm.apply(x, eps)


FEATURE_MAPS = ("identity", "elu", "relu", "silu")


def feature_map(x: Tensor, kind: str) -> Tensor:
    """Linear-attention feature maps as fla names them (``elu`` is ``elu(x) + 1``)."""
    if kind == "identity":
        return x
    if kind == "elu":
        return F.elu(x) + 1
    if kind == "relu":
        return F.relu(x)
    if kind == "silu":
        return F.silu(x)
    raise ValueError(f"feature_map={kind!r}: use one of {FEATURE_MAPS}")
