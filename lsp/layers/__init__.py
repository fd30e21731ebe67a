"""Token mixers, feed-forward blocks and norms for lsp's hybrid decoder (docs/design.md,
Parallel layout).

Every layer takes and returns megatron's ``[sequence, batch, hidden]`` layout and a
:class:`ParallelContext` that says how it is split (TP over heads, CP over the sequence, EP over
experts); with the default context it runs in one process without any process group.

======================  =================================================  ===========
layer                   math                                               letter
======================  =================================================  ===========
LinearAttention         linear attention; decay none / fixed / per head /  ``L``
                        per key channel (GLA)
DeltaNet                delta rule                                         ``D``
GatedDeltaNet           delta rule with Mamba-2 decay                      ``G``
MixtureOfMemories       routed Gated DeltaNet memories (+ shared one)      ``M``
SoftmaxAttention        causal softmax attention, K/V gathered over CP     ``S``
DenseFFN / MoEFFN       SwiGLU MLP / megatron MoE (alltoall dispatcher)
======================  =================================================  ===========

Mixers and FFNs return ``(output, aux_loss or None)``.
"""

from lsp.layers.attention import SoftmaxAttention, causal_attention
from lsp.layers.context import SP_METHODS, ParallelContext, sequence_op
from lsp.layers.conv import ShortConvolution
from lsp.layers.delta_net import DeltaNet, GatedDeltaNet
from lsp.layers.ffn import DenseFFN, MoEFFN
from lsp.layers.init import init_parameters
from lsp.layers.linear_attention import LinearAttention
from lsp.layers.mom import MixtureOfMemories
from lsp.layers.norm import HeadRMSNorm, RMSNorm
from lsp.layers.symbols import Symbols

MIXERS = {
    Symbols.LINEAR_ATTENTION: LinearAttention,
    Symbols.DELTANET: DeltaNet,
    Symbols.GATED_DELTANET: GatedDeltaNet,
    Symbols.MIXTURE_OF_MEMORIES: MixtureOfMemories,
    Symbols.SOFTMAX_ATTENTION: SoftmaxAttention,
}

__all__ = [
    "MIXERS",
    "Symbols",
    "SP_METHODS",
    "ParallelContext",
    "sequence_op",
    "LinearAttention",
    "DeltaNet",
    "GatedDeltaNet",
    "MixtureOfMemories",
    "SoftmaxAttention",
    "causal_attention",
    "DenseFFN",
    "MoEFFN",
    "RMSNorm",
    "HeadRMSNorm",
    "ShortConvolution",
    "init_parameters",
]
