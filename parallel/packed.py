"""Packed documents (``cu_seqlens``) under sequence parallelism: offsets, shard plans, states.

Every rank passes the GLOBAL offsets ``0 = cu[0] < ... < cu[N] = P * T_local`` and the
per-document initial states of all ``N`` documents. A rank holding tokens ``[t0, t1)`` splits
its shard at the boundaries inside it:

- the *stretch*: the tokens of the document open at ``t0`` that continue from the previous
  rank (on rank 0 the first document, whose initial state enters the exchange as ``S_init``).
  When it is the whole shard, it chains through the exchange as an unpacked shard does (its
  pair and effective queries from ``pairs.local_pass``, or, on the Triton kernels, the exchange
  inside the op); beside a boundary it runs after the exchange, as an op call from the state
  that arrives;
- the *rest*: the documents starting inside the shard, run as one local packed call with their
  own initial states.

If the shard holds the start of any document after ``t0``'s (or ``t0`` itself starts a document,
on ranks after the first), nothing of the incoming state survives the shard: its transition is
zero and its ``B`` is the state at the shard end (of the last document, from its own initial
state); the effective queries after the first boundary are zero.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import Tensor

from lsp.kernels.offsets import check_document_states, check_offsets, host_offsets

_HASH_MOD = (1 << 61) - 1
# check_offsets and check_document_states (imported above) live beside the offsets cache in
# lsp.kernels.offsets, so that the kernels check a packed call with the same messages


def offsets_digest(offsets: list[int]) -> int:
    """A 61-bit polynomial hash of the offsets, so that ranks can compare them in one integer."""
    h = 0
    for x in offsets:
        h = (h * 1_000_003 + x + 1) % _HASH_MOD
    return h


@dataclass(frozen=True)
class ShardPlan:
    """How a rank's shard ``[t0, t1)`` splits at the global document boundaries.

    ``stretch``: local token count of the continuing document (0 when ``t0`` starts a document
    on a rank after the first); ``first_doc``: the document open at ``t0``; ``rest_offsets``:
    local offsets of the remaining documents (relative to the end of the stretch), ``None`` when
    there are none; ``rest_docs``: their global indices; ``ends``: for each document that ends
    in this shard, ``(global index, local source)`` with source ``-1`` for the stretch and ``i``
    for the ``i``-th document of the rest.
    """

    t0: int
    t1: int
    stretch: int
    first_doc: int
    rest_offsets: list[int] | None
    rest_docs: list[int]
    ends: list[tuple[int, int]]

    @property
    def resets(self) -> bool:
        """True when the incoming state does not survive the shard (``A = 0``)."""
        return self.rest_offsets is not None


def plan_shard(offsets: list[int], rank: int, T_local: int) -> ShardPlan:
    t0, t1 = rank * T_local, (rank + 1) * T_local
    d0 = bisect.bisect_right(offsets, t0) - 1  # the document holding token t0
    continues = rank == 0 or offsets[d0] < t0
    stretch = min(offsets[d0 + 1], t1) - t0 if continues else 0
    start = t0 + stretch
    rest_docs, rest_offsets, ends = [], None, []
    if continues and offsets[d0 + 1] <= t1:
        ends.append((d0, -1))
    if start < t1:
        first = d0 + 1 if continues else d0
        last = bisect.bisect_right(offsets, t1 - 1) - 1
        rest_docs = list(range(first, last + 1))
        rest_offsets = [offsets[d] - start for d in rest_docs] + [t1 - start]
        ends += [(d, i) for i, d in enumerate(rest_docs) if offsets[d + 1] <= t1]
    return ShardPlan(t0, t1, stretch, d0, rest_offsets, rest_docs, ends)


def document_positions(cu_seqlens: Tensor, t0: int, T: int) -> Tensor:
    """Each token's position inside its document, for the global tokens ``[t0, t0 + T)``.

    ``cu_seqlens`` holds the global offsets; the result is ``[T]`` int64 on their device
    (0 at a document's first token). Short convolutions mask the taps at ``j > position`` with it;
    routed Mixture-of-Memories finds the document starts (position 0).
    """
    cu = cu_seqlens.to(torch.int64)
    p = torch.arange(t0, t0 + T, device=cu.device)
    doc = torch.searchsorted(cu, p, right=True) - 1
    return p - cu[doc]
