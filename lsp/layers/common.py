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
    """``[B, T, h, d] -> [T, B, h*d]`` (contiguous, for a row-parallel output projection)."""
    return o.flatten(-2).transpose(0, 1).contiguous()


def wide(x: Tensor) -> Tensor:
    """``x`` in float32 when it is half precision (gates and router scores), else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (fla's ``l2norm``)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


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
