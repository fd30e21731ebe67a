"""Linear attention with the decay choices of docs/design.md, Transition kinds (fla's
``LinearAttention``, ``SimpleGatedLinearAttention`` and ``GatedLinearAttention`` in one layer).

Per head, with feature-mapped (and optionally normalised) queries and keys:

    S_t = diag(a_t) S_{t-1} + k_t v_t^T,      o_t = norm(S_t^T q_t / sqrt(d_k)) [* silu(gate_t)]

``decay`` picks ``a_t``:

=========  ================================================================  ==================
decay      log a_t                                                           family
=========  ================================================================  ==================
"none"     0                                                                 linear attention
"fixed"    log(1 - 2^(-5 - h)) for head h, no parameters                     RetNet / Lightning
"head"     logsigmoid(x_t w_h) / normalizer, one per head                    simple GLA (Mamba-2
                                                                             style scalar gate)
"key"      logsigmoid(W_up (W_down x_t) + b) / normalizer, per key channel,  GLA
           ``W_down`` low-rank ``[r, D]``
=========  ================================================================  ==================

Feature maps (``identity``, ``elu`` = elu + 1, ``relu``, ``silu``) and query/key normalisation
(``none``, ``l2``, ``sum`` = divide by the sum over channels) follow fla's options. Heads are
split over TP with every per-head parameter; ``W_down`` is whole on every TP rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lsp import ops
from lsp.layers.common import FEATURE_MAPS, feature_map, l2norm, merge_heads, split_heads, wide
from lsp.layers.context import (
    ColumnLinear,
    ParallelContext,
    RowLinear,
    default_out_init,
    local_heads,
    normal_init,
    replicated_parameter,
    sequence_op,
)
from lsp.layers.conv import ShortConvolution
from lsp.layers.norm import HeadRMSNorm

__all__ = ["LinearAttention", "DECAYS", "QK_NORMS"]

DECAYS = ("none", "fixed", "head", "key")
QK_NORMS = ("none", "l2", "sum")


class LinearAttention(nn.Module):
    """Linear attention with optional decay, feature map, q/k normalisation and output gate.

    Args:
        hidden_size, num_heads, head_dim: widths (value head width ``head_dim * expand_v``).
        decay: ``"none"``, ``"fixed"``, ``"head"`` or ``"key"`` (table in the module doc).
        feature_map: ``"identity"``, ``"elu"``, ``"relu"`` or ``"silu"`` on q and k.
        qk_norm: ``"none"``, ``"l2"`` or ``"sum"``.
        use_short_conv / conv_size: causal depthwise conv on q, k, v before the feature map.
        use_output_gate: ``norm(o) * silu(x W_g)`` (GLA); otherwise ``norm(o)``.
        gate_low_rank_dim, gate_logit_normalizer: GLA gate (``"key"``) rank and divisor.
        ctx: the parallel layout; init_std, num_layers: initialisation.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        expand_v: float = 1.0,
        decay: str = "key",
        feature_map: str = "identity",
        qk_norm: str = "none",
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_backend: str = "torch",
        conv_recompute: bool = False,
        use_output_gate: bool = True,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        norm_eps: float = 1e-5,
        ctx: ParallelContext | None = None,
        init_std: float = 0.02,
        num_layers: int = 1,
    ):
        super().__init__()
        if decay not in DECAYS:
            raise ValueError(f"decay={decay!r}: use one of {DECAYS}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r}: use one of {FEATURE_MAPS}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r}: use one of {QK_NORMS}")
        self.ctx = ctx = ctx or ParallelContext()
        H, D = num_heads, hidden_size
        self.h = local_heads(H, ctx.tp_size)
        self.dk, self.dv = head_dim, int(head_dim * expand_v)
        self.decay, self.fmap, self.qk_norm = decay, feature_map, qk_norm
        self.use_short_conv, self.use_output_gate = use_short_conv, use_output_gate
        self.normalizer = gate_logit_normalizer
        init = normal_init(init_std)
        self.q_proj = ColumnLinear(D, H * self.dk, ctx, init=init)
        self.k_proj = ColumnLinear(D, H * self.dk, ctx, init=init)
        self.v_proj = ColumnLinear(D, H * self.dv, ctx, init=init)
        conv = dict(backend=conv_backend, recompute=conv_recompute)
        if use_short_conv:
            self.q_conv = ShortConvolution(H * self.dk, conv_size, ctx, activation=None, **conv)
            self.k_conv = ShortConvolution(H * self.dk, conv_size, ctx, activation=None, **conv)
            self.v_conv = ShortConvolution(H * self.dv, conv_size, ctx, activation=None, **conv)
        if decay == "fixed":
            heads = torch.arange(H, dtype=torch.float64)
            log_a = torch.log1p(-torch.pow(2.0, -5.0 - heads))
            start = ctx.tp_rank * self.h
            self.register_buffer("log_decay", log_a[start:start + self.h].clone(), persistent=False)
        elif decay == "head":
            self.gk_proj = ColumnLinear(D, H, ctx, init=init)
        elif decay == "key":
            self.gk_down = replicated_parameter((gate_low_rank_dim, D), ctx, init)
            self.gk_up = ColumnLinear(gate_low_rank_dim, H * self.dk, ctx, bias=True, init=init)
        if use_output_gate:
            self.g_proj = ColumnLinear(D, H * self.dv, ctx, init=init)
        self.o_norm = HeadRMSNorm(H, self.dv, ctx, eps=norm_eps, gated=use_output_gate)
        self.o_proj = RowLinear(H * self.dv, D, ctx, init=default_out_init(init_std, num_layers))

    def _log_decay(self, xb: Tensor) -> Tensor | None:
        if self.decay == "none":
            return None
        if self.decay == "fixed":
            g = self.log_decay.to(torch.promote_types(xb.dtype, torch.float32))
            return g.expand(xb.shape[0], xb.shape[1], self.h).contiguous()
        if self.decay == "head":
            return F.logsigmoid(wide(self.gk_proj(xb))) / self.normalizer
        low = F.linear(xb, self.gk_down.to(xb.dtype))
        return split_heads(F.logsigmoid(wide(self.gk_up(low))) / self.normalizer, self.dk)

    def _qk(self, x: Tensor) -> Tensor:
        x = feature_map(split_heads(x, self.dk), self.fmap)
        if self.qk_norm == "l2":
            return l2norm(x)
        if self.qk_norm == "sum":
            return x / x.sum(-1, keepdim=True)
        return x

    def forward(self, x: Tensor, cu_seqlens=None) -> tuple[Tensor, None]:
        """``x``: ``[T_local, B, D]``; returns ``(output of the same shape, None)``.
        ``cu_seqlens``: packed documents (``lsp.layers.context.document_rows``)."""
        xb = self.ctx.enter_tp(x).transpose(0, 1)  # [B, T, D]
        q, k, v = self.q_proj(xb), self.k_proj(xb), self.v_proj(xb)
        if self.use_short_conv:
            cu = cu_seqlens
            q, k, v = (self.q_conv(q, cu_seqlens=cu), self.k_conv(k, cu_seqlens=cu),
                       self.v_conv(v, cu_seqlens=cu))
        q, k, v = self._qk(q), self._qk(k), split_heads(v, self.dv)
        g = self._log_decay(xb)
        args = [q, k, v] if g is None else [q, k, v, g]
        o = sequence_op(ops.linear_attention, *args, ctx=self.ctx, cu_seqlens=cu_seqlens)
        gate = split_heads(self.g_proj(xb), self.dv) if self.use_output_gate else None
        return self.o_proj(merge_heads(self.o_norm(o, gate))), None
