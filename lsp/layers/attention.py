"""Softmax attention for hybrid models, with K/V all-gathered over the CP group (LASP-2H).

Each CP rank holds a contiguous slice of the sequence (the same layout as the recurrent
layers). Its queries at global positions ``[r T, (r+1) T)`` attend to the keys at
``[0, (r+1) T)``: the layer all-gathers K and V over the CP group (autograd all-gather whose
backward reduce-scatters), keeps that prefix and applies a lower-right-aligned causal mask, so
no TransformerEngine is needed (``torch.nn.functional.scaled_dot_product_attention``). Rotary
embeddings use global positions. Heads (and K/V heads, for grouped-query attention) are split
over TP.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
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


def causal_attention(q: Tensor, k: Tensor, v: Tensor, group=None, balance: bool = False,
                     overlap: bool = False) -> Tensor:
    """Causal softmax attention of this CP rank's queries over the whole sequence so far.

    ``q``: ``[B, T, H, d]`` (this rank's contiguous slice), ``k, v``: ``[B, T, Hkv, d]``
    (same slice; ``Hkv`` divides ``H``); ``group``: the CP group (``None``: one rank);
    ``balance``: split the attention work evenly over the CP ranks
    (:func:`lsp.parallel.cp_attention.balanced_causal_attention`) instead of each rank scoring
    its own queries (the last rank then does ``2P - 1`` times the first rank's work);
    ``overlap``: the balanced exchange runs alongside each rank's own blocks. Returns
    ``[B, T, H, d]``, equal to the matching slice of causal attention over the whole sequence.
    """
    from lsp.parallel.seq_gather import all_gather_sequence

    T = q.shape[1]
    multi = group is not None and torch.distributed.get_world_size(group) > 1
    if multi:
        r = torch.distributed.get_rank(group)
        k = all_gather_sequence(k, group, dim=1)
        v = all_gather_sequence(v, group, dim=1)
        if not balance:
            k, v = k[:, : (r + 1) * T], v[:, : (r + 1) * T]
    if k.shape[2] != q.shape[2]:
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, d]
    if multi and balance:
        from lsp.parallel.cp_attention import balanced_causal_attention

        return balanced_causal_attention(q, k, v, group, overlap).transpose(1, 2)
    S = k.shape[2]
    if S == T:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif _flash_ok(q, k, v):
        # flash attention's causal mask is aligned lower-right when S > T (as torch's own
        # ``causal_lower_right`` dispatch uses it); called directly because that CausalBias
        # tensor subclass breaks under selective activation checkpointing's dispatch mode
        o = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)[0]
    else:  # CPU, or small fp32 on a GPU: materialised lower-right mask (query i sees j <= i+S-T)
        _check_small_mask(q, S)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2)


# The materialised path scores every (query, key) pair in memory; above this many scores on a GPU
# it would run out of memory at long context, so it refuses instead of trying.
_MASKED_GPU_MAX_SCORES = 1 << 28


def _flash_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether flash attention takes these inputs. Checked with ``is_causal=False``, as torch's
    ``causal_lower_right`` dispatch does: torch's check refuses ``is_causal`` with more keys than
    queries (its ``is_causal`` means upper-left), while the flash op itself aligns lower-right."""
    if not q.is_cuda:
        return False
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    return can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, False))


def _check_small_mask(q: Tensor, S: int) -> None:
    B, H, T, d = q.shape
    if q.is_cuda and B * H * T * S > _MASKED_GPU_MAX_SCORES:
        raise ValueError(
            f"softmax attention under context parallelism: flash attention does not take these "
            f"inputs (dtype {q.dtype}, head_dim {d}, {T} queries over {S} keys), and the masked "
            f"fallback would hold {B * H * T * S:,} scores; run in bf16/fp16 "
            f"(train.precision=bf16) with head_dim a multiple of 8 up to 256")


class SoftmaxAttention(nn.Module):
    """Multi-head (or grouped-query) causal softmax attention with rotary embeddings.

    Args:
        hidden_size, num_heads, head_dim: widths; num_kv_heads: K/V heads (default
            ``num_heads``; must divide it); rope_theta: rotary base; ctx, init_std, num_layers.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        num_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        ctx: ParallelContext | None = None,
        init_std: float = 0.02,
        num_layers: int = 1,
    ):
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
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
                                          self.ctx.cp_attention_balance)
        else:
            o = causal_attention(q, k, v, self.ctx.cp_group, self.ctx.cp_attention_balance,
                                 self.ctx.cp_attention_overlap)
        return self.o_proj(merge_heads(o)), None
