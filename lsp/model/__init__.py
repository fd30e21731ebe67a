"""``lsp.model``: the hybrid decoder LM built from a layer pattern string.

    cfg = ModelConfig(pattern="GGMS", num_experts=4, ...)   # one mixer letter per layer
    model = DecoderLM(cfg, ParallelContext(topo, sp_method="allscan"))
    out = model(split_batch(ids, ctx), split_batch(labels, ctx))
    out.loss.backward(); reduce_gradients(model, topo)
"""

from lsp.model.config import FFN_LETTERS, MIXER_LETTERS, ModelConfig
from lsp.model.decoder import Block, DecoderLM, LMOutput, split_batch

__all__ = [
    "ModelConfig",
    "MIXER_LETTERS",
    "FFN_LETTERS",
    "DecoderLM",
    "Block",
    "LMOutput",
    "split_batch",
]
