"""Chunkwise linear attention: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``.

Linear attention is the delta rule's chunk machinery with ``R = V`` (no WY form): the forward is
the segment-parallel state pass of ``common/state.py`` with the outputs fused in, the backward
the reverse pass plus ``common/grad.py``. The per-token oracle is
``lsp.ops.linear_attn.naive`` (the tests compare the two).
"""

from __future__ import annotations


def chunk_linear_attention(q, k, v, g, scale, initial_state, output_final_state, chunk_size,
                           num_segments, cu_seqlens=None, boundary=None):
    from ..common.chunk import chunk_forward

    return chunk_forward(q, k, v, None, g, scale, initial_state, output_final_state, chunk_size,
                         num_segments, cu_seqlens, boundary)
