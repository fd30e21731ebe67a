"""Additive linear attention (plain, per-head decay, per-channel decay / GLA) on the kernels."""

from .chunk import chunk_linear_attention

__all__ = ["chunk_linear_attention"]
