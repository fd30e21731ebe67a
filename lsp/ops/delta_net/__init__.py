"""The delta rule (DeltaNet, Gated DeltaNet, vector-gated): chunkwise torch path and naive oracle."""

from lsp.ops.delta_net.chunk import chunk_delta_rule
from lsp.ops.delta_net.naive import naive_recurrent_delta_rule

__all__ = ["chunk_delta_rule", "naive_recurrent_delta_rule"]
