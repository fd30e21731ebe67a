"""Chunkwise delta rule: ``S_t = (I - b_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T``.

The WY form (``stages.py``: ``wy.py`` with no gate or one per head, ``intra.py`` with a
per-channel gate) turns each chunk into ``R = U - W S0``; from there the state passes, the
segment scan and the gradients are those of ``common/``, which takes these stages from here.
The per-token oracle is ``lsp.ops.delta_net.naive``.
"""

from __future__ import annotations


def chunk_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size,
                     num_segments, cu_seqlens=None, boundary=None):
    from ..common.chunk import chunk_forward
    from . import stages  # the WY form, composed with common/'s stages

    return chunk_forward(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size,
                         num_segments, cu_seqlens, boundary, stages=stages)
