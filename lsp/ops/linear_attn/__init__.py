"""Additive linear attention with optional decay: chunkwise torch path and naive oracle."""

from lsp.ops.linear_attn.chunk import chunk_linear_attention
from lsp.ops.linear_attn.naive import naive_recurrent_linear_attention

__all__ = ["chunk_linear_attention", "naive_recurrent_linear_attention"]
