"""The letters of a model's layer pattern, in one table (as megatron-core's hybrid ``Symbols``).

``ModelConfig.pattern`` has one mixer letter per layer and ``ffn_pattern`` one feed-forward
letter per layer; every place that reads a pattern uses these names.
"""

from __future__ import annotations


class Symbols:
    """Pattern letters: token mixers, then feed-forward blocks."""

    LINEAR_ATTENTION = "L"
    DELTANET = "D"
    GATED_DELTANET = "G"
    MIXTURE_OF_MEMORIES = "M"
    SOFTMAX_ATTENTION = "S"

    MOE = "E"
    DENSE_FFN = "F"
    NO_FFN = "-"

    MIXERS = {
        LINEAR_ATTENTION: "LinearAttention",
        DELTANET: "DeltaNet",
        GATED_DELTANET: "GatedDeltaNet",
        MIXTURE_OF_MEMORIES: "MixtureOfMemories",
        SOFTMAX_ATTENTION: "SoftmaxAttention",
    }
    FFNS = {MOE: "MoE", DENSE_FFN: "dense SwiGLU", NO_FFN: "none"}
    # mixers with a recurrent state (and a short convolution that reads the previous CP rank)
    RECURRENT = frozenset((LINEAR_ATTENTION, DELTANET, GATED_DELTANET, MIXTURE_OF_MEMORIES))
    DELTA_RULE = frozenset((DELTANET, GATED_DELTANET))


__all__ = ["Symbols"]
