"""Chunkwise PyTorch delta rule in the WY form (``backend="torch"``); see ``lsp.ops.common.chunk``."""

from __future__ import annotations

from torch import Tensor

from lsp.ops.common.chunk import DEFAULT_CHUNK_SIZE, chunk_recurrence


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """``S_t = (I - b k k^T) diag(exp(g_t)) S_{t-1} + b k v^T``, chunk by chunk (WY form)."""
    return chunk_recurrence(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
