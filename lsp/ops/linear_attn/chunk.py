"""Chunkwise PyTorch linear attention (``backend="torch"``); see ``lsp.ops.common.chunk``."""

from __future__ import annotations

from torch import Tensor

from lsp.ops.common.chunk import DEFAULT_CHUNK_SIZE, chunk_recurrence


def chunk_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``, chunk by chunk."""
    return chunk_recurrence(q, k, v, g, None, scale, initial_state, output_final_state, chunk_size)
