"""Naive per-token recurrence for the delta rule: the in-repo oracle.

    S'  = diag(exp(g_t)) S_{t-1}                       (decay first; none for DeltaNet)
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T = (I - beta_t k_t k_t^T) S' + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

One Python step per token; differentiable by autograd. Tests run it in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsp.ops.common.chunk import compute_dtype
from lsp.ops.common.varlen import run_documents_naive
from lsp.ops.linear_attn.naive import decay_state


def naive_recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token (gated) delta rule. Shapes as ``lsp.ops.delta_rule``.

    With ``cu_seqlens`` (``B = 1``) each document runs separately from its own
    ``initial_state[n]`` and the final states are ``[N, H, K, V]``.
    """
    if cu_seqlens is not None:
        return run_documents_naive(naive_recurrent_delta_rule, cu_seqlens, q, k, v, beta, g,
                                   scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state)
    ct, out_dtype = compute_dtype(q.dtype), v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v, beta = q.to(ct) * scale, k.to(ct), v.to(ct), beta.to(ct)
    g = None if g is None else g.to(ct)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(ct)
    outs = []
    for t in range(T):
        S = decay_state(S, None if g is None else g[:, t])
        pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + beta[:, t, :, None, None] * k[:, t, :, :, None] * (v[:, t] - pred)[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1).to(out_dtype)
    return o, (S if output_final_state else None)
