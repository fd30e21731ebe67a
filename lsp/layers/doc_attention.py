"""Document-causal softmax attention for packed sequences (``cu_seqlens``).

A query attends to the keys of its own document at or before it: block-diagonal causal
attention. The keys are all-gathered over the CP group as in
:func:`lsp.layers.attention.causal_attention` (LASP-2H). Every document runs on the same fused
causal kernels as unpacked attention (cuDNN or flash by ``attention_backend``), so no
``[T, S]`` mask is built and the cost is that of attention within the documents: without the
balanced CP layout the documents are grouped by padded length, one batched call per group (the
document that continues from an earlier rank aligned lower-right); with it each partial block
of the balanced split is cut along the documents (``lsp.parallel.cp_doc_attention``) and the
partials merge by their log-sum-exp. Every query sees at least itself, so no row is empty.
Rotary embeddings need no per-document reset: they are relative, and no score crosses a
document.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsp.layers.context import document_rows

__all__ = ["document_causal_attention"]


def document_causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens, group=None,
                              balance: bool = False, backend: str = "auto") -> Tensor:
    """Document-causal attention of this CP rank's queries over the sequence so far.

    ``q [B, T, H, d]``, ``k, v [B, T, Hkv, d]`` (this rank's contiguous slice); ``cu_seqlens``:
    the GLOBAL offsets of each row (``lsp.layers.context.document_rows``); ``group``: the CP
    group; ``balance``: the balanced work split (``lsp.parallel.cp_doc_attention``);
    ``backend``: the attention kernel (``lsp.parallel.cp_attention.resolve_backend``). Returns
    ``[B, T, H, d]``, the matching slice of document-causal attention over the whole sequence.
    Without the balanced layout see :func:`_per_document`.
    """
    from lsp.parallel.seq_gather import all_gather_sequence

    B, T = q.shape[:2]
    rows = document_rows(cu_seqlens, B)
    multi = group is not None and torch.distributed.get_world_size(group) > 1
    r = torch.distributed.get_rank(group) if multi else 0
    if multi and not balance and backend == "cudnn":  # on every rank, before the gather
        raise ValueError(
            "attention_backend='cudnn' under context parallelism needs the balanced layout "
            "(parallel.attention_load_balance=true): without it a document continuing from an "
            "earlier rank needs a lower-right causal mask, which torch's cuDNN attention does "
            "not align; or use attention_backend=auto or flash")
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
        return balanced_document_attention(q, k, v, rows, group, backend).transpose(1, 2)
    return _per_document(q, k, v, rows, r * T, backend)


def _per_document(q: Tensor, k: Tensor, v: Tensor, rows: list[Tensor], t0: int,
                  backend: str) -> Tensor:
    """Each document's queries of this shard (global ``[t0, t0 + T)``) over its keys.

    A document that starts on this shard is a square causal block; those are grouped by
    length (``cp_doc_attention.square_groups``: quarter-octave buckets, zero rows padded at the
    end, where causality keeps them unseen by the real queries; a lone unpadded document is a
    slice) and each group runs as one batch. A document that started on an
    earlier rank (at most one per row) is its shard's queries over all its keys so far, causal
    aligned lower-right. The blocks run on ``backend``'s kernels (cuDNN or flash under ``auto``
    for the square ones, flash for the lower-right ones, whose mask torch's cuDNN op does not
    align), so the cost is that of causal attention over each document, with no ``[T, S]``
    mask. Index gathers move the rows in and out; everything is differentiable.
    """
    from lsp.parallel.cp_attention import BlockAttention, resolve_backend
    from lsp.parallel.cp_doc_attention import cached_tables, group_batch, real_rows

    B, T, H, d = q.shape
    S = k.shape[1]
    qf, kf, vf = q.reshape(B * T, H, d), k.reshape(B * S, H, d), v.reshape(B * S, H, d)
    groups, crossing, inverse = cached_tables(
        rows, ("doc_attention", t0, T, S, str(q.device)),
        lambda: _document_tables(rows, t0, T, S, q.device))
    outs = []
    batches = [(group_batch(qf, g), group_batch(kf, g, keys=True), group_batch(vf, g, keys=True))
               for g in groups]
    sq = resolve_backend(backend, [(b[0], b[1], True) for b in batches], ("cudnn", "flash"))
    for (qb, kb, vb), g in zip(batches, groups):
        o = BlockAttention.apply(qb, kb, vb, True, sq).transpose(1, 2)  # [m, L, H, d]
        outs.append(real_rows(o, g[2]))
    for qr, kr, nq, nk in crossing:
        qb = qf[qr:qr + nq].transpose(0, 1)[None]
        kb, vb = (x[kr:kr + nk].transpose(0, 1)[None] for x in (kf, vf))
        lower = resolve_backend(backend, [(qb, kb, True)], ("flash",))
        outs.append(BlockAttention.apply(qb, kb, vb, True, lower)[0].transpose(0, 1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return (out if inverse is None else out[inverse]).reshape(B, T, H, d)


def _document_tables(rows: list[Tensor], t0: int, T: int, S: int, dev):
    """The index tables of :func:`_per_document`, built on the host (the offsets are host
    values; boolean masks on the device would each cost a host sync, their result sizes being
    data-dependent) and copied to ``dev``: the square groups (``square_groups``), the crossing
    documents ``(q row, k row, queries, keys)`` and the permutation back to token order
    (``None`` where the parts are already in token order, as for one document).
    """
    from lsp.kernels.offsets import host_offsets
    from lsp.parallel.cp_doc_attention import groups_to_device, square_groups, to_device

    square = []  # (q row, k row, length) of the documents that start on this shard
    crossing = []  # (q row, k row, queries, keys)
    for b, cu in enumerate(rows):
        offs = host_offsets(cu)
        for s, e in zip(offs[:-1], offs[1:]):
            lo, hi = max(s, t0), min(e, t0 + T)
            if lo >= hi:
                continue
            if s >= t0:
                square.append((b * T + lo - t0, b * S + lo, hi - lo))
            else:
                crossing.append((b * T + lo - t0, b * S + s, hi - lo, hi - s))
    groups = square_groups(square)
    order = torch.cat([g[0] for g in groups] + [torch.arange(qr, qr + nq)
                                                for qr, _, nq, _ in crossing])
    if torch.equal(order, torch.arange(order.numel())):
        return groups_to_device(groups, dev), crossing, None
    inverse = torch.empty_like(order)  # every query row is in exactly one part
    inverse[order] = torch.arange(order.numel())
    return groups_to_device(groups, dev), crossing, to_device(inverse, dev)
