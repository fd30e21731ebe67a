"""DeltaNet and Gated DeltaNet token mixers (fla's ``DeltaNet`` / ``GatedDeltaNet``).

Per head, with ``q_t, k_t`` L2-normalised after a short causal convolution and SiLU:

    DeltaNet:        S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    Gated DeltaNet:  S_t = (I - b_t k_t k_t^T) (a_t S_{t-1}) + b_t k_t v_t^T
    o_t = norm(S_t^T q_t / sqrt(d_k)) [* silu(gate_t)],   output = o W_o^T

``b_t = sigmoid(x_t w_b)``; ``log a_t = -exp(A_log) * softplus(x_t w_a + dt_bias)`` (Mamba-2).
Heads are split over TP (projections, conv channels, ``A_log``, ``dt_bias``, norm weights);
the recurrence crosses CP ranks through ``lsp.layers.context.sequence_op``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lsp import ops
from lsp.layers.common import l2norm, merge_heads, split_heads, wide
from lsp.layers.context import (
    ColumnLinear,
    ParallelContext,
    RowLinear,
    default_out_init,
    head_parameter,
    local_heads,
    normal_init,
    sequence_op,
)
from lsp.layers.conv import ShortConvolution
from lsp.layers.norm import HeadRMSNorm

__all__ = ["DeltaNet", "GatedDeltaNet", "a_log_init", "dt_bias_init", "mamba_decay"]


def mamba_decay(a: Tensor, A_log: Tensor, dt_bias: Tensor) -> Tensor:
    """``log a_t = -exp(A_log) softplus(a + dt_bias)`` per head (float32 at least)."""
    return -wide(A_log).exp() * F.softplus(wide(a) + wide(dt_bias))


def a_log_init(shape, gen):
    """``log U(1, 16)`` per head (fla's Gated DeltaNet draws ``A ~ U(0, 16)``; 1 avoids log 0)."""
    return torch.log(1 + 15 * torch.rand(shape, generator=gen, dtype=torch.float64))


def dt_bias_init(shape, gen, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4):
    """Inverse softplus of ``dt ~ logU(dt_min, dt_max)`` (Mamba-2)."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class _DeltaRuleMixer(nn.Module):
    gated: bool = False

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_backend: str = "torch",
        conv_recompute: bool = False,
        use_output_gate: bool | None = None,
        norm_eps: float = 1e-5,
        ctx: ParallelContext | None = None,
        init_std: float = 0.02,
        num_layers: int = 1,
    ):
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        H = num_heads
        self.h = local_heads(H, ctx.tp_size)
        self.dk, self.dv = head_dim, int(head_dim * expand_v)
        self.use_short_conv = use_short_conv
        self.use_output_gate = self.gated if use_output_gate is None else use_output_gate
        init = normal_init(init_std)
        D = hidden_size
        self.q_proj = ColumnLinear(D, H * self.dk, ctx, init=init)
        self.k_proj = ColumnLinear(D, H * self.dk, ctx, init=init)
        self.v_proj = ColumnLinear(D, H * self.dv, ctx, init=init)
        self.b_proj = ColumnLinear(D, H, ctx, init=init)
        if self.gated:
            self.a_proj = ColumnLinear(D, H, ctx, init=init)
            self.A_log = head_parameter((H,), ctx, a_log_init)
            self.dt_bias = head_parameter((H,), ctx, dt_bias_init)
        conv = dict(backend=conv_backend, recompute=conv_recompute)
        if use_short_conv:
            self.q_conv = ShortConvolution(H * self.dk, conv_size, ctx, **conv)
            self.k_conv = ShortConvolution(H * self.dk, conv_size, ctx, **conv)
            self.v_conv = ShortConvolution(H * self.dv, conv_size, ctx, **conv)
        if self.use_output_gate:
            self.g_proj = ColumnLinear(D, H * self.dv, ctx, init=init)
        self.o_norm = HeadRMSNorm(H, self.dv, ctx, eps=norm_eps, gated=self.use_output_gate)
        self.o_proj = RowLinear(H * self.dv, D, ctx, init=default_out_init(init_std, num_layers))

    def _qkv(self, xb: Tensor, k_proj, v_proj, copies: int = 1,
             cu_seqlens=None) -> tuple[Tensor, Tensor]:
        k, v = k_proj(xb), v_proj(xb)
        if self.use_short_conv:
            return (self.k_conv(k, copies, cu_seqlens=cu_seqlens),
                    self.v_conv(v, copies, cu_seqlens=cu_seqlens))
        return F.silu(k), F.silu(v)

    def _query(self, xb: Tensor, cu_seqlens=None) -> Tensor:
        q = self.q_proj(xb)
        return self.q_conv(q, cu_seqlens=cu_seqlens) if self.use_short_conv else F.silu(q)

    def _decay(self, a: Tensor) -> Tensor:
        """``log a_t = -exp(A_log) softplus(a + dt_bias)``, ``[B, T, h]`` (float32 at least)."""
        return mamba_decay(a, self.A_log, self.dt_bias)

    def _output(self, o: Tensor, xb: Tensor) -> Tensor:
        gate = split_heads(self.g_proj(xb), self.dv) if self.use_output_gate else None
        return self.o_proj(merge_heads(self.o_norm(o, gate)))

    def forward(self, x: Tensor, cu_seqlens=None) -> tuple[Tensor, None]:
        """``x``: ``[T_local, B, D]`` (sequence-sharded over TP when TP > 1). Returns
        ``(output of the same shape, None)`` (``None``: no auxiliary loss). ``cu_seqlens``:
        packed documents (``lsp.layers.context.document_rows``)."""
        xb = self.ctx.enter_tp(x).transpose(0, 1)  # [B, T, D]
        q = l2norm(split_heads(self._query(xb, cu_seqlens), self.dk))
        k, v = self._qkv(xb, self.k_proj, self.v_proj, cu_seqlens=cu_seqlens)
        k, v = l2norm(split_heads(k, self.dk)), split_heads(v, self.dv)
        beta = torch.sigmoid(self.b_proj(xb))
        args = [q, k, v, beta]
        if self.gated:
            args.append(self._decay(self.a_proj(xb)))
        o = sequence_op(ops.delta_rule, *args, ctx=self.ctx, cu_seqlens=cu_seqlens)
        return self._output(o, xb), None


class DeltaNet(_DeltaRuleMixer):
    """DeltaNet (Yang et al. 2024): the delta rule with sigmoid write strength and no decay.

    Args: hidden_size, num_heads, head_dim (key width; value width ``head_dim * expand_v``),
    use_short_conv / conv_size (causal conv on q, k, v; SiLU otherwise), use_output_gate
    (default off), norm_eps, ctx (layout), init_std, num_layers (output-projection rescaling).
    """

    gated = False


class GatedDeltaNet(_DeltaRuleMixer):
    """Gated DeltaNet (Yang et al. 2025): DeltaNet with a Mamba-2 decay before the delta step
    and a SiLU output gate (on by default). Arguments as :class:`DeltaNet`."""

    gated = True
