"""Packed documents (``cu_seqlens``) under sequence parallelism: offsets, shard plans, states.

Every rank passes the GLOBAL offsets ``0 = cu[0] < ... < cu[N] = P * T_local`` and the
per-document initial states of all ``N`` documents. A rank holding tokens ``[t0, t1)`` splits
its shard at the boundaries inside it:

- the *stretch*: the tokens of the document open at ``t0`` that continue from the previous
  rank (on rank 0 the first document, whose initial state enters the exchange as ``S_init``).
  Its pair and effective queries come from ``pairs.local_pass`` as for an unpacked shard, and it
  chains through the exchange unchanged;
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

from lsp.kernels.offsets import host_offsets

_HASH_MOD = (1 << 61) - 1


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def check_offsets(op: str, cu_seqlens: object, T: int, what: str = "the sequence") -> list[int]:
    """Offsets of a packed call as ints; raises a named ``ValueError`` for bad ones."""
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(
            f"{op}: cu_seqlens must be an int32 or int64 tensor [N+1] of document offsets, "
            f"got {type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{op}: cu_seqlens has dtype {cu_seqlens.dtype}; document offsets must be int32 or "
            "int64 (for example cu_seqlens.long())"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{op}: cu_seqlens has shape {_shape(cu_seqlens)}; it must be 1-D [N+1] with N >= 1 "
            "documents: [0, end of document 0, ..., T]"
        )
    cu = list(host_offsets(cu_seqlens))
    if cu[0] != 0:
        raise ValueError(f"{op}: cu_seqlens starts at {cu[0]}; the first offset must be 0")
    if cu[-1] != T:
        raise ValueError(
            f"{op}: cu_seqlens ends at {cu[-1]} but {what} has T={T} tokens; the last "
            f"offset must be T={T}"
        )
    for i in range(len(cu) - 1):
        if cu[i + 1] <= cu[i]:
            raise ValueError(
                f"{op}: cu_seqlens is not strictly increasing: cu_seqlens[{i}]={cu[i]} and "
                f"cu_seqlens[{i + 1}]={cu[i + 1]}; every document needs at least one token "
                "(drop empty documents from the offsets)"
            )
    return cu


def check_document_states(op: str, initial_state: object, N: int, H: int, K: int, V: int,
                          device: torch.device) -> None:
    """``initial_state`` of a packed call must be ``[N, H, K, V]`` (one per document)."""
    if initial_state is None:
        return
    if not isinstance(initial_state, Tensor) or not initial_state.is_floating_point():
        raise ValueError(
            f"{op}: initial_state must be a floating tensor [N, H, K, V] = [{N}, {H}, {K}, {V}], "
            f"got {getattr(initial_state, 'dtype', type(initial_state).__name__)}"
        )
    if initial_state.shape != torch.Size((N, H, K, V)):
        raise ValueError(
            f"{op}: initial_state has shape {_shape(initial_state)}; with cu_seqlens of {N} "
            f"documents the state must be [N, H, K, V] = [{N}, {H}, {K}, {V}] (one per document)"
        )
    if initial_state.device != device:
        raise ValueError(
            f"{op}: initial_state is on {initial_state.device} but q is on {device}; move it "
            f"to {device}"
        )


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
    (0 at a document's first token). Short convolutions mask the taps at ``j > position`` and
    softmax attention the keys before the document start with it.
    """
    cu = cu_seqlens.to(torch.int64)
    p = torch.arange(t0, t0 + T, device=cu.device)
    doc = torch.searchsorted(cu, p, right=True) - 1
    return p - cu[doc]


def document_ids(cu_seqlens: Tensor, t0: int, T: int) -> Tensor:
    """The document index of each global token in ``[t0, t0 + T)``, ``[T]`` int64."""
    cu = cu_seqlens.to(torch.int64)
    p = torch.arange(t0, t0 + T, device=cu.device)
    return torch.searchsorted(cu, p, right=True) - 1
