"""Softmax attention for hybrid models, with K/V all-gathered over the CP group (LASP-2H).

Each CP rank holds a contiguous slice of the sequence (the same layout as the recurrent
layers). Its queries at global positions ``[r T, (r+1) T)`` attend to the keys at
``[0, (r+1) T)``: the layer all-gathers K and V over the CP group (autograd all-gather whose
backward reduce-scatters), keeps that prefix and applies a lower-right-aligned causal mask, so
no TransformerEngine is needed: the kernels are torch's cuDNN or flash attention ops, or the
math reference (``attention_backend``, :func:`lsp.parallel.cp_attention.resolve_backend`).
Rotary embeddings use global positions. Heads (and K/V heads, for grouped-query attention) are
split over TP.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from lsp.layers.common import merge_heads, split_heads
from lsp.layers.context import (
    ColumnLinear,
    ParallelContext,
    RowLinear,
    default_out_init,
    local_heads,
    normal_init,
)
from lsp.parallel.cp_attention import (  # noqa: F401 (_check_small_mask: tests use it here)
    BACKENDS,
    BlockAttention,
    _check_small_mask,
    balanced_causal_attention,
    resolve_backend,
)

__all__ = ["SoftmaxAttention", "apply_rope", "causal_attention"]


def apply_rope(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotary embedding (rotate-half form) of ``x [B, T, H, d]`` at integer ``positions [T]``."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {d}")
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[None, :, None, :].to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def causal_attention(q: Tensor, k: Tensor, v: Tensor, group=None,
                     load_balance: bool = False, balance_overlap: bool = False,
                     backend: str = "auto") -> Tensor:
    """Causal softmax attention of this CP rank's queries over the whole sequence so far.

    ``q``: ``[B, T, H, d]`` (this rank's contiguous slice), ``k, v``: ``[B, T, Hkv, d]``
    (same slice; ``Hkv`` divides ``H``); ``group``: the CP group (``None``: one rank);
    ``load_balance``: split the attention work evenly over the CP ranks
    (:func:`lsp.parallel.cp_attention.balanced_causal_attention`) instead of each rank scoring
    its own queries (the last rank then does ``2P - 1`` times the first rank's work);
    ``balance_overlap``: the balanced exchange runs alongside each rank's own blocks;
    ``backend``: the
    attention kernel, one of ``auto | cudnn | flash | math``
    (:func:`lsp.parallel.cp_attention.resolve_backend`: ``auto`` is cuDNN where torch has it
    for the device, dtype and shapes, else flash, else math, and math on the CPU; an explicit
    backend that cannot take the inputs raises). Returns ``[B, T, H, d]``, equal to the
    matching slice of causal attention over the whole sequence.

    Without ``load_balance``, rank ``r > 0`` scores ``T`` queries over ``(r + 1) T`` keys with a
    lower-right causal mask, which flash and math take and torch's cuDNN op does not (its causal
    mask is aligned top-left): there ``cudnn`` raises and ``auto`` takes flash.
    """
    from lsp.parallel.seq_gather import all_gather_sequence

    T = q.shape[1]
    multi = group is not None and torch.distributed.get_world_size(group) > 1
    lower_right = multi and not load_balance
    if lower_right and backend == "cudnn":  # on every rank, before the gather
        raise ValueError(
            "attention_backend='cudnn' under context parallelism needs the balanced layout "
            "(parallel.attention_load_balance=true: square causal and full blocks only); "
            "without it ranks r > 0 need a lower-right causal mask, which torch's cuDNN "
            "attention does not align; or use attention_backend=auto or flash")
    if multi:
        r = torch.distributed.get_rank(group)
        k = all_gather_sequence(k, group, dim=1)
        v = all_gather_sequence(v, group, dim=1)
        if not load_balance:
            k, v = k[:, : (r + 1) * T], v[:, : (r + 1) * T]
    if k.shape[2] != q.shape[2]:
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    # [B, H, T, d] views of the token-major tensors: every kernel here takes the strides, and
    # returns its output token-major, so the transposes copy nothing
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if multi and load_balance:
        return balanced_causal_attention(q, k, v, group, balance_overlap, backend).transpose(1, 2)
    # ``auto`` with a lower-right mask: flash on every rank (rank 0's square block could take
    # cuDNN, but one kernel for the layer on every rank keeps the ranks' numerics alike)
    backend = resolve_backend(backend, [(q, k, True)],
                              ("flash",) if lower_right else ("cudnn", "flash"))
    return BlockAttention.apply(q, k, v, True, backend).transpose(1, 2)


class SoftmaxAttention(nn.Module):
    """Multi-head (or grouped-query) causal softmax attention with rotary embeddings.

    Args:
        hidden_size, num_heads, head_dim: widths; num_kv_heads: K/V heads (default
            ``num_heads``; must divide it); rope_theta: rotary base; attention_backend: the
            kernel, ``auto | cudnn | flash | math`` (see :func:`causal_attention`); ctx,
            init_std, num_layers.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        num_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        attention_backend: str = "auto",
        ctx: ParallelContext | None = None,
        init_std: float = 0.02,
        num_layers: int = 1,
    ):
        super().__init__()
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r} is not an attention "
                             f"backend; use one of {BACKENDS}")
        self.ctx = ctx = ctx or ParallelContext()
        self.backend = attention_backend
        H = num_heads
        Hkv = num_kv_heads or num_heads
        if H % Hkv:
            raise ValueError(f"num_kv_heads={Hkv} must divide num_heads={H}")
        self.h = local_heads(H, ctx.tp_size)
        self.hkv = local_heads(Hkv, ctx.tp_size, "num_kv_heads")
        self.d, self.theta = head_dim, rope_theta
        init = normal_init(init_std)
        D = hidden_size
        self.q_proj = ColumnLinear(D, H * head_dim, ctx, init=init)
        self.k_proj = ColumnLinear(D, Hkv * head_dim, ctx, init=init)
        self.v_proj = ColumnLinear(D, Hkv * head_dim, ctx, init=init)
        self.o_proj = RowLinear(H * head_dim, D, ctx, init=default_out_init(init_std, num_layers))

    def forward(self, x: Tensor, cu_seqlens=None) -> tuple[Tensor, None]:
        """``x``: ``[T_local, B, D]``; returns ``(output of the same shape, None)``.
        ``cu_seqlens``: packed documents, attention within each document only
        (``lsp.layers.doc_attention``)."""
        xb = self.ctx.enter_tp(x).transpose(0, 1)  # [B, T, D], T = this CP rank's tokens
        T = xb.shape[1]
        pos = self.ctx.cp_rank * T + torch.arange(T, device=xb.device)
        q = apply_rope(split_heads(self.q_proj(xb), self.d), pos, self.theta)
        k = apply_rope(split_heads(self.k_proj(xb), self.d), pos, self.theta)
        v = split_heads(self.v_proj(xb), self.d)
        if cu_seqlens is not None:
            from lsp.layers.doc_attention import document_causal_attention

            o = document_causal_attention(q, k, v, cu_seqlens, self.ctx.cp_group,
                                          self.ctx.attention_load_balance, self.backend)
        else:
            o = causal_attention(q, k, v, self.ctx.cp_group, self.ctx.attention_load_balance,
                                 self.ctx.attention_balance_overlap, self.backend)
        return self.o_proj(merge_heads(o)), None
