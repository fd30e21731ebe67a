"""Document-causal softmax attention for packed sequences (``cu_seqlens``).

A query attends to the keys of its own document at or before it: block-diagonal causal
attention. The keys are all-gathered over the CP group as in
:func:`lsp.layers.attention.causal_attention` (LASP-2H); the mask is built from the global
document offsets (each CP rank knows its queries' global positions) and applied with
``torch.nn.functional.scaled_dot_product_attention`` (its math backend on CPU); with the
balanced CP layout the masked blocks merge by their log-sum-exp
(``lsp.parallel.cp_doc_attention``). Every query sees at least itself, so no row of the mask is
empty. Rotary embeddings need no per-document reset: they are relative, and no score crosses a
document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lsp.layers.context import document_rows
from lsp.parallel.packed import document_ids

__all__ = ["document_causal_mask", "document_causal_attention"]


def document_causal_mask(cu_seqlens: Tensor, t0: int, T: int, S: int) -> Tensor:
    """``[T, S]`` bool: query ``t0 + i`` may attend key ``j`` (same document, ``j <= t0 + i``)."""
    qd = document_ids(cu_seqlens, t0, T)
    kd = document_ids(cu_seqlens, 0, S)
    qpos = torch.arange(t0, t0 + T, device=qd.device)
    kpos = torch.arange(S, device=qd.device)
    return (qd[:, None] == kd[None, :]) & (kpos[None, :] <= qpos[:, None])


def document_causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens, group=None,
                              balance: bool = False) -> Tensor:
    """Document-causal attention of this CP rank's queries over the sequence so far.

    ``q [B, T, H, d]``, ``k, v [B, T, Hkv, d]`` (this rank's contiguous slice); ``cu_seqlens``:
    the GLOBAL offsets of each row (``lsp.layers.context.document_rows``); ``group``: the CP
    group; ``balance``: the balanced work split (``lsp.parallel.cp_doc_attention``). Returns
    ``[B, T, H, d]``, the matching slice of document-causal attention over the whole sequence.
    """
    from lsp.parallel.seq_gather import all_gather_sequence

    B, T = q.shape[:2]
    rows = document_rows(cu_seqlens, B)
    multi = group is not None and torch.distributed.get_world_size(group) > 1
    r = torch.distributed.get_rank(group) if multi else 0
    if multi:
        k = all_gather_sequence(k, group, dim=1)
        v = all_gather_sequence(v, group, dim=1)
        if not balance:
            k, v = k[:, : (r + 1) * T], v[:, : (r + 1) * T]
    if k.shape[2] != q.shape[2]:
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    if multi and balance:
        from lsp.parallel.cp_doc_attention import balanced_document_attention

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return balanced_document_attention(q, k, v, rows, group).transpose(1, 2)
    S = k.shape[1]
    mask = torch.stack([document_causal_mask(cu, r * T, T, S) for cu in rows]).to(q.device)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, d]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    return o.transpose(1, 2)
