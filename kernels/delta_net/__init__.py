"""The delta rule (DeltaNet, Gated DeltaNet, per-channel gated) on the kernels."""

from .chunk import chunk_delta_rule

__all__ = ["chunk_delta_rule"]
