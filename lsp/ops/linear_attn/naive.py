"""Naive per-token recurrence for additive linear attention: the in-repo oracle.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t

One Python step per token; differentiable by autograd. Tests run it in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsp.ops.common.chunk import compute_dtype
from lsp.ops.common.varlen import run_documents_naive


def decay_state(S: Tensor, g_t: Tensor | None) -> Tensor:
    """``diag(exp(g_t)) S`` for ``S [B,H,K,V]`` and ``g_t`` ``[B,H]`` (per head) or ``[B,H,K]``."""
    if g_t is None:
        return S
    a = g_t.exp()
    return S * (a[..., None, None] if a.dim() == 2 else a[..., None])


def naive_recurrent_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token linear attention. Shapes as ``lsp.ops.linear_attention``.

    With ``cu_seqlens`` (``B = 1``) each document runs separately from its own
    ``initial_state[n]`` and the final states are ``[N, H, K, V]``.
    """
    if cu_seqlens is not None:
        return run_documents_naive(naive_recurrent_linear_attention, cu_seqlens, q, k, v, g,
                                   scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state)
    ct, out_dtype = compute_dtype(q.dtype), v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v = q.to(ct) * scale, k.to(ct), v.to(ct)
    g = None if g is None else g.to(ct)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(ct)
    outs = []
    for t in range(T):
        S = decay_state(S, None if g is None else g[:, t])
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1).to(out_dtype)
    return o, (S if output_final_state else None)
