"""Packed variable-length documents (``cu_seqlens``, fla-compatible) for the public ops.

A packed call has ``B = 1`` and ``cu_seqlens`` ``[N+1]`` (int32 / int64) with the document
offsets ``0 = cu[0] < cu[1] < ... < cu[N] = T``; document ``n`` is tokens ``[cu[n], cu[n+1])``
and starts from its own state ``initial_state[n]`` (``[N, H, K, V]``, zeros when ``None``); the
final state is ``[N, H, K, V]``, one per document. No state crosses a boundary.

The torch path runs the documents as a batch of separate sequences: documents are grouped by
their length rounded up to a power of two (in chunks), each group is gathered into a
``[n, L, H, D]`` batch zero-padded at the end, and run through the chunkwise recurrence with the
group's initial states. Padding at the end is exact (a zero token has ``k = v = q = 0``,
``beta = 0``, ``g = 0``: it leaves the state unchanged), every chunk belongs to one document, and
the work is at most twice the packed length in a logarithmic number of batched runs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lsp.parallel.packed import check_document_states, check_offsets

def check_cu_seqlens(op: str, q: Tensor, v: Tensor, cu_seqlens: object,
                     initial_state: object) -> list[int]:
    """Check a packed call's offsets and per-document initial state; return the offsets.

    Called after the usual checks of ``q``, ``k``, ``v`` (which then saw no initial state).
    """
    B, T, H, K = q.shape
    if B != 1:
        raise ValueError(
            f"{op}: cu_seqlens needs a batch of 1 (all documents packed along T), got B={B}; "
            f"pack the batch into one sequence of {B * T} tokens (x.reshape(1, -1, H, D)) with "
            "offsets for every document"
        )
    cu = check_offsets(op, cu_seqlens, T)
    check_document_states(op, initial_state, len(cu) - 1, H, K, v.shape[-1], q.device)
    return cu


def _padded_length(n: int, chunk_size: int) -> int:
    """``n`` rounded up to a power of two (below a chunk) or a power-of-two number of chunks."""
    if n <= chunk_size:
        return 1 << (n - 1).bit_length()
    c = -(-n // chunk_size)
    return chunk_size * (1 << (c - 1).bit_length())


def run_documents(
    recurrence: Callable[..., tuple[Tensor, Tensor | None]],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    offsets: list[int],
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """Run ``recurrence`` (``chunk_recurrence``'s signature) on each packed document.

    ``q`` etc. are ``[1, T, H, D]``; returns ``o`` ``[1, T, H, V]`` and the final states
    ``[N, H, K, V]`` (or ``None``). Differentiable by autograd through the gathers.
    """
    N = len(offsets) - 1
    T = q.shape[1]
    dev = q.device
    if N == 1:
        return recurrence(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    lens = [offsets[i + 1] - offsets[i] for i in range(N)]
    groups: dict[int, list[int]] = {}
    for d, n in enumerate(lens):
        groups.setdefault(_padded_length(n, chunk_size), []).append(d)

    def padded(x: Tensor | None) -> Tensor | None:
        # [1, T, ...] -> [T+1, ...], the extra row being the zero padding token
        return None if x is None else torch.cat([x[0], x.new_zeros((1,) + x.shape[2:])])

    xs = [padded(x) for x in (q, k, v, g, beta)]
    outs, positions, states, order = [], [], [], []
    for L, docs in sorted(groups.items()):
        idx = torch.full((len(docs), L), T, dtype=torch.long)
        for i, d in enumerate(docs):
            idx[i, : lens[d]] = torch.arange(offsets[d], offsets[d + 1])
        idx = idx.to(dev)
        qb, kb, vb, gb, bb = (None if x is None else x[idx] for x in xs)
        h0 = None if initial_state is None else initial_state[torch.tensor(docs, device=dev)]
        ob, Sb = recurrence(qb, kb, vb, gb, bb, scale, h0, output_final_state,
                            min(chunk_size, L))
        valid = (idx < T).reshape(-1)
        outs.append(ob.reshape((-1,) + ob.shape[2:])[valid])
        positions.append(idx.reshape(-1)[valid])
        states.append(Sb)
        order.extend(docs)
    inv = torch.argsort(torch.cat(positions))
    o = torch.cat(outs)[inv].unsqueeze(0)
    if not output_final_state:
        return o, None
    S = torch.cat(states)[torch.argsort(torch.tensor(order, device=dev))]
    return o, S


def run_documents_naive(fn: Callable, cu_seqlens: Tensor, *tensors: Tensor | None,
                        initial_state: Tensor | None, output_final_state: bool,
                        **kw) -> tuple[Tensor, Tensor | None]:
    """The per-token oracle per document: each document separately with its own state."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    outs, states = [], []
    for n in range(len(cu) - 1):
        sl = slice(cu[n], cu[n + 1])
        h0 = None if initial_state is None else initial_state[n : n + 1]
        o, S = fn(*(None if t is None else t[:, sl] for t in tensors), initial_state=h0,
                  output_final_state=True, **kw)
        outs.append(o)
        states.append(S)
    return torch.cat(outs, dim=1), (torch.cat(states) if output_final_state else None)
