"""Mixture-of-Memories (MoM, Du et al. 2025; fla's ``MomAttention``) on the gated delta rule.

A router sends each token to its top-k of ``M`` memories; each memory has its own key, value,
write-strength and decay projections and its own ``[d_k, d_v]`` state per head, and is updated
only by the tokens routed to it. An optional shared memory sees every token. The output mixes
the routed memories' outputs with the renormalised top-k router weights, plus the shared one:

    o_t = sum_{m in topk(t)} w_{t,m} o^m_t  (+ o^shared_t),   then gated norm and W_o.

Dense form: memory ``m`` runs over *all* tokens with ``beta = 0`` and ``log a = 0`` where the
token is not routed to it, which leaves its state unchanged there, so it equals running the
memory on its routed tokens only (fla compacts tokens per memory instead; the short convolution
here runs over the sequence in token order before routing). Every memory has the same length,
so the ``M (+1)`` memories are stacked along the head axis and cross CP ranks in one packed
``sequence_parallel`` exchange (``M + 1`` state pairs per head).

``routed=True`` runs each routed memory over the tokens routed to it only, gathered in order
(the shared memory still sees every token): the op's work drops from ``M + 1`` to about
``topk + 1`` passes over the sequence. The gathered batch is padded to the longest memory's
count with non-routed tokens, whose ``beta = 0, log a = 0`` leave the state alone and whose
router weight is 0, so the result equals the dense form. That length is data-dependent: one
host sync per layer call reads it (``int(count.max())``), and under CP each rank has its own,
so the exchange runs with ``equal_lengths=False`` (it moves only states). With packed documents
each memory's gathered sequence also takes every document's first token of the shard, where its
log-decay is set to ``-inf`` (a full forget, exact on every backend; ``beta = 0`` and weight 0
where the token is not routed to the memory): the state restarts at each boundary as in the
dense form's per-document call, a boundary inside a shard zeroes its transition for the
exchange, and the gathered positions of different memories need no offsets of their own.

``memory_checkpointing=True`` runs the memories one after another instead, each under its own
activation checkpoint that returns the memory's weighted output: a backward then holds one
memory's activations at a time, not ``M + 1`` (the dense form's ``M + 1`` copies of k, v, the
op's states and outputs are what makes MoM the largest layer at long context), at the price of
one more forward of each memory and one exchange per memory. Same result either way.

The router runs on this rank's own tokens before the TP gather (its weight is whole on every
TP rank; its gradient is summed over TP), and adds a per-sequence load-balancing loss
``coeff * M * sum_m f_m P_m`` (Switch-style, averaged over sequences) whose token counts are
summed over the TP x CP ranks that hold the sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lsp import ops
from lsp.layers.common import l2norm, merge_heads, split_heads, wide
from lsp.layers.context import (
    ColumnLinear,
    ParallelContext,
    RowLinear,
    default_out_init,
    document_rows,
    head_parameter,
    local_heads,
    normal_init,
    replicated_parameter,
    sequence_op,
)
from lsp.layers.conv import ShortConvolution
from lsp.layers.delta_net import a_log_init, dt_bias_init, mamba_decay
from lsp.layers.norm import HeadRMSNorm

__all__ = ["MixtureOfMemories"]


class MixtureOfMemories(nn.Module):
    """MoM over Gated DeltaNet memories.

    Args:
        hidden_size, num_heads, head_dim, expand_v: widths as in Gated DeltaNet.
        num_memories: ``M``; topk: memories per token; shared_memory: add a memory that every
            token updates; aux_loss_coeff: load-balancing loss weight (0 disables it);
            memory_checkpointing: one memory at a time, each checkpointed (see module doc);
            routed: each routed memory over its own tokens only (see module doc).
        use_short_conv, conv_size, use_output_gate, norm_eps, ctx, init_std, num_layers: as in
            Gated DeltaNet (q projection, convolutions, ``A_log``/``dt_bias``, norm and output
            are shared by the memories, as in fla).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        num_memories: int = 4,
        topk: int = 2,
        shared_memory: bool = True,
        aux_loss_coeff: float = 0.01,
        memory_checkpointing: bool = False,
        routed: bool = False,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_backend: str = "torch",
        conv_recompute: bool = False,
        use_output_gate: bool = True,
        norm_eps: float = 1e-5,
        ctx: ParallelContext | None = None,
        init_std: float = 0.02,
        num_layers: int = 1,
    ):
        super().__init__()
        if not 1 <= topk <= num_memories:
            raise ValueError(f"MoM topk={topk} must lie in [1, num_memories={num_memories}]")
        self.ctx = ctx = ctx or ParallelContext()
        H, D = num_heads, hidden_size
        self.h = local_heads(H, ctx.tp_size)
        self.dk, self.dv = head_dim, int(head_dim * expand_v)
        self.M, self.topk, self.shared = num_memories, topk, shared_memory
        self.aux_loss_coeff = aux_loss_coeff
        self.memory_checkpointing, self.routed = memory_checkpointing, routed
        self.use_short_conv, self.use_output_gate = use_short_conv, use_output_gate
        init = normal_init(init_std)
        self.router = replicated_parameter((num_memories, D), ctx, init)
        self.q_proj = ColumnLinear(D, H * self.dk, ctx, init=init)
        n = num_memories + int(shared_memory)  # the shared memory is the last one
        self.k_proj = nn.ModuleList(ColumnLinear(D, H * self.dk, ctx, init=init) for _ in range(n))
        self.v_proj = nn.ModuleList(ColumnLinear(D, H * self.dv, ctx, init=init) for _ in range(n))
        self.b_proj = nn.ModuleList(ColumnLinear(D, H, ctx, init=init) for _ in range(n))
        self.a_proj = nn.ModuleList(ColumnLinear(D, H, ctx, init=init) for _ in range(n))
        self.A_log = head_parameter((H,), ctx, a_log_init)
        self.dt_bias = head_parameter((H,), ctx, dt_bias_init)
        conv = dict(backend=conv_backend, recompute=conv_recompute)
        if use_short_conv:
            self.q_conv = ShortConvolution(H * self.dk, conv_size, ctx, **conv)
            self.k_conv = ShortConvolution(H * self.dk, conv_size, ctx, **conv)
            self.v_conv = ShortConvolution(H * self.dv, conv_size, ctx, **conv)
        if use_output_gate:
            self.g_proj = ColumnLinear(D, H * self.dv, ctx, init=init)
        self.o_norm = HeadRMSNorm(H, self.dv, ctx, eps=norm_eps, gated=use_output_gate)
        self.o_proj = RowLinear(H * self.dv, D, ctx, init=default_out_init(init_std, num_layers))

    # routing ----------------------------------------------------------------------------------
    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Router on this rank's tokens ``x [T, B, D]``.

        Returns ``(weights [T, B, M], mask [T, B, M], aux)``: renormalised top-k weights (zero off
        the top-k), the 0/1 routing mask, and this rank's share of the balancing loss (``None``
        when disabled or not training).
        """
        scores = torch.softmax(wide(F.linear(x, self.router.to(x.dtype))), dim=-1)
        top_w, top_i = scores.topk(self.topk, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        weights = torch.zeros_like(scores).scatter(-1, top_i, top_w).to(x.dtype)
        mask = torch.zeros_like(weights).scatter(-1, top_i, 1.0)
        aux = None
        if self.aux_loss_coeff > 0 and self.training and torch.is_grad_enabled():
            aux = self._balance_loss(scores, mask)
        return weights, mask, aux

    def _balance_loss(self, scores: Tensor, mask: Tensor) -> Tensor:
        """``coeff * mean_b M sum_m f_bm P_bm``; this rank's tokens give its share of ``P``."""
        counts = mask.detach().sum(0)  # [B, M] tokens of each sequence per memory
        group = self.ctx.tp_cp_group
        parts = 1
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
            parts = dist.get_world_size(group)
        tokens = scores.shape[0] * parts  # tokens per sequence
        f = counts / (tokens * self.topk)
        P = scores.sum(0) / tokens
        return self.aux_loss_coeff * self.M * (f * P).sum(-1).mean()

    # memories ---------------------------------------------------------------------------------
    def _decay(self, a: Tensor) -> Tensor:
        return mamba_decay(a, self.A_log, self.dt_bias)

    def _inputs(self, xb: Tensor, q: Tensor, mask: Tensor, idx: list[int], cu_seqlens=None):
        """The delta-rule inputs of memories ``idx``, stacked along the head axis:
        ``q, k [B, T, n h, dk]``, ``v [B, T, n h, dv]``, ``beta, g [B, T, n h]`` with ``beta = 0``
        and ``log a = 0`` where the memory's ``mask [B, T, n]`` is 0 (tokens not routed to it)."""
        h, dk, dv, n = self.h, self.dk, self.dv, len(idx)
        B, T = xb.shape[:2]
        k = torch.cat([self.k_proj[m](xb) for m in idx], dim=-1)
        v = torch.cat([self.v_proj[m](xb) for m in idx], dim=-1)
        if self.use_short_conv:
            k = self.k_conv(k, copies=n, cu_seqlens=cu_seqlens)
            v = self.v_conv(v, copies=n, cu_seqlens=cu_seqlens)
        else:
            k, v = F.silu(k), F.silu(v)
        qn = q if n == 1 else q.unsqueeze(2).expand(B, T, n, h, dk).reshape(B, T, n * h, dk)
        k = l2norm(k.reshape(B, T, n * h, dk))
        v = v.reshape(B, T, n * h, dv)
        beta = torch.sigmoid(torch.stack([self.b_proj[m](xb) for m in idx], dim=2))  # [B,T,n,h]
        g = self._decay(torch.stack([self.a_proj[m](xb) for m in idx], dim=2))
        keep = mask.unsqueeze(-1)  # [B, T, n, 1]
        beta = (beta * keep.to(beta.dtype)).reshape(B, T, n * h)
        g = (g * keep.to(g.dtype)).reshape(B, T, n * h)
        return qn, k, v, beta, g

    def _memory(self, m: int, xb: Tensor, q: Tensor, mask: Tensor, w: Tensor | None,
                cu_seqlens=None) -> Tensor:
        """Memory ``m`` over all tokens (``mask [B, T, 1]``: its routing), times its router
        weight ``w [B, T]`` (``None``: the shared memory), or over its routed tokens only when
        ``routed``. Returns ``[B, T, h, dv]``."""
        if self.routed and w is not None:
            return self._gathered(xb, q, mask, w.unsqueeze(-1), [m], cu_seqlens)
        o = sequence_op(ops.delta_rule, *self._inputs(xb, q, mask, [m], cu_seqlens),
                        ctx=self.ctx, cu_seqlens=cu_seqlens)
        return o if w is None else o * w[..., None, None].to(o.dtype)

    def _gathered(self, xb: Tensor, q: Tensor, mask: Tensor, weights: Tensor,
                  idx: list[int], cu_seqlens=None) -> Tensor:
        """Memories ``idx``, each over the tokens routed to it only (``mask [B, T, n]`` its
        routing, ``weights [B, T, n]`` its mixing weights), stacked along the head axis and
        padded to the longest count; returns their weighted sum ``[B, T, h, dv]``. With packed
        documents every document start of the shard is taken too, with a full forget there
        (module docstring)."""
        h, dv, n = self.h, self.dv, len(idx)
        B, T = xb.shape[:2]
        routed = mask.bool()
        starts = None
        if cu_seqlens is not None:
            starts = self._document_starts(cu_seqlens, B, T, xb.device)  # [B, T]
            routed = routed | starts[..., None]
        count = routed.sum(1)  # [B, n]
        L = int(count.max())  # host sync: the gathered length sizes the op's inputs
        pos = torch.arange(T, device=xb.device)[None, :, None]
        # each memory's routed positions first, in token order, then the others (padding)
        order = torch.where(routed, pos, pos + T).argsort(dim=1)[:, :L]  # [B, L, n]
        heads = order.unsqueeze(-1).expand(B, L, n, h).reshape(B, L, n * h)

        def take(t: Tensor) -> Tensor:  # [B, T, n h, ...] -> [B, L, n h, ...]
            ix = heads.view(B, L, n * h, *([1] * (t.dim() - 3))).expand(B, L, *t.shape[2:])
            return t.gather(1, ix)

        # padding tokens: beta = 0, log a = 0 (the state passes through unchanged)
        qn, k, v, beta, g = self._inputs(xb, q, mask, idx, cu_seqlens)
        if starts is not None:  # a full forget at each document start (every memory)
            g = g.masked_fill(starts[..., None], float("-inf"))
        o = sequence_op(ops.delta_rule, *(take(t) for t in (qn, k, v, beta, g)), ctx=self.ctx,
                        equal_lengths=False).reshape(B, L, n, h, dv)
        w = weights.gather(1, order)  # 0 at padding tokens (not routed: off the top-k)
        contrib = (o * w[..., None, None].to(o.dtype)).reshape(B, L * n, h, dv)
        at = order.reshape(B, L * n, 1, 1).expand(B, L * n, h, dv)
        return o.new_zeros(B, T, h, dv).scatter_add(1, at, contrib)

    def _document_starts(self, cu_seqlens, B: int, T: int, device) -> Tensor:
        """``[B, T]`` bool: this CP shard's tokens that start a document (global offsets)."""
        from lsp.parallel.packed import document_positions

        return torch.stack([document_positions(r, self.ctx.cp_rank * T, T) == 0
                            for r in document_rows(cu_seqlens, B)]).to(device)

    def _routed_memories(self, xb: Tensor, q: Tensor, mask: Tensor, weights: Tensor,
                         cu_seqlens=None) -> Tensor:
        """The routed memories over their own tokens (one op call), plus the shared memory."""
        out = self._gathered(xb, q, mask[..., : self.M], weights, list(range(self.M)),
                             cu_seqlens)
        if self.shared:
            out = out + self._memory(self.M, xb, q, mask[..., self.M:], None, cu_seqlens)
        return out

    def _all_memories(self, xb: Tensor, q: Tensor, mask: Tensor, weights: Tensor,
                      cu_seqlens=None) -> Tensor:
        """All memories in one op call, stacked along the head axis (the dense form)."""
        n = len(self.k_proj)
        B, T = xb.shape[:2]
        o = sequence_op(ops.delta_rule, *self._inputs(xb, q, mask, list(range(n)), cu_seqlens),
                        ctx=self.ctx, cu_seqlens=cu_seqlens)
        o = o.reshape(B, T, n, self.h, self.dv)
        out = (o[:, :, : self.M] * weights[..., None, None].to(o.dtype)).sum(2)
        if self.shared:
            out = out + o[:, :, self.M]
        return out

    # mixing -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, cu_seqlens=None) -> tuple[Tensor, Tensor | None]:
        """``x``: ``[T_local, B, D]``; returns ``(output of the same shape, aux loss or None)``.
        ``cu_seqlens``: packed documents; every memory resets at each boundary (a memory's
        state is a delta-rule state like any other; routing itself keeps no state)."""
        ctx, dk, dv = self.ctx, self.dk, self.dv
        weights, mask, aux = self.route(x)
        routing = ctx.enter_tp(torch.cat([weights, mask], dim=-1)).transpose(0, 1)  # [B, T, 2M]
        weights, mask = routing[..., : self.M], routing[..., self.M:].detach()
        xb = ctx.enter_tp(x).transpose(0, 1)  # [B, T, D]
        B, T = xb.shape[:2]
        n = len(self.k_proj)
        if self.shared:
            mask = torch.cat([mask, mask.new_ones(B, T, 1)], dim=-1)  # [B, T, n]

        q = self.q_proj(xb)
        q = self.q_conv(q, cu_seqlens=cu_seqlens) if self.use_short_conv else F.silu(q)
        q = l2norm(split_heads(q, dk))  # [B, T, h, dk], shared by the memories
        if self.memory_checkpointing:
            out = None
            for m in range(n):
                w = weights[..., m] if m < self.M else None
                if torch.is_grad_enabled():
                    o = checkpoint(self._memory, m, xb, q, mask[..., m:m + 1], w, cu_seqlens,
                                   use_reentrant=False)
                else:
                    o = self._memory(m, xb, q, mask[..., m:m + 1], w, cu_seqlens)
                out = o if out is None else out + o
        elif self.routed:
            out = self._routed_memories(xb, q, mask, weights, cu_seqlens)
        else:
            out = self._all_memories(xb, q, mask, weights, cu_seqlens)
        gate = split_heads(self.g_proj(xb), dv) if self.use_output_gate else None
        return self.o_proj(merge_heads(self.o_norm(out, gate))), aux
