"""Public op entry points and their pure-PyTorch reference paths.

    o, S = lsp.ops.linear_attention(q, k, v, g=None, *, scale=None, initial_state=None,
                                    output_final_state=False, backend="auto")
    o, S = lsp.ops.delta_rule(q, k, v, beta, g=None, *, ...)

Per family, ``lsp.ops.linear_attn`` and ``lsp.ops.delta_net`` hold the chunkwise torch path
(``chunk.py``) beside the naive per-token recurrence (``naive.py``) that tests use as oracle.
"""

from lsp.ops.api import delta_rule, linear_attention

__all__ = ["linear_attention", "delta_rule"]
