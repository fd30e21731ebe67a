"""State exchange across sequence-parallel ranks: an exclusive scan of affine pairs.

Rank ``r`` of ``P`` holds the pair ``(A_r, B_r)`` of its slice (``parallel/pairs.py``). The
forward scan gives every rank the state before its slice and, when asked, the state after the
whole sequence::

    S_start_0 = S_init,   S_start_{r+1} = A_r S_start_r + B_r,   S_final = S_start_P

Its backward is the reverse scan of state gradients. With ``G_r`` the gradient that reaches
``S_start_r`` from rank ``r``'s own outputs and ``D_P`` the summed gradient of the replicated
final state::

    D_r = A_r^T D_{r+1} + G_r,    dB_r = D_{r+1},    dA_r = D_{r+1} S_start_r^T,    dS_init = D_0

Written by hand: no library offers an exclusive scan of non-commutative affine pairs over
``torch.distributed`` with its adjoint (and ``torch.distributed.nn.functional.all_gather``
mis-indexes ranks in backward on gloo subgroups: docs/design.md, Pitfalls).

Costs, for ``P`` ranks, a state of ``[H, K, V]`` per sequence in the batch (multiply by ``B``),
``e`` bytes per element (4 for float32), ``n`` All-Scan blocks, and a transition ``A`` of
``a = 0`` (identity), ``H`` (scalar), ``H*K`` (diagonal) or ``H*K*K`` (full, the delta rules)
elements; ``s = H*K*V``:

=========  ===================================  =============================  ===========================
method     messages per rank (forward)          bytes received per rank (fwd)  latency (hops, forward)
=========  ===================================  =============================  ===========================
allgather  1 all-gather of ``(A_r, B_r)``       ``(P-1) (a + s) e``            one all-gather (NCCL ring:
                                                                               ``P-1`` steps of ``(a+s) e``)
                                                                               then ``P`` local folds
allscan    ``n`` sends + ``n`` receives          ``s e`` (``A`` never travels)  ``(P-1) + (n-1)`` hops of
           (ranks 0 / P-1: one side only)                                      ``s e / n``: one message plus
                                                                               ``P-1`` block hops
ring       1 send + 1 receive                    ``s e``                        ``P-1`` hops of ``s e``
=========  ===================================  =============================  ===========================

Backward: ``allgather`` all-gathers the state gradients ``G_r`` (``(P-1) s e`` received) and folds
the suffix; ``allscan`` and ``ring`` run the same chain in reverse. When the final state is
returned, ``allgather`` folds it locally on every rank (no extra message) and packs its gradient
into the backward all-gather (``2 (P-1) s e``); ``allscan`` and ``ring`` broadcast it from the
last rank (one more ``s e`` collective) and all-reduce its gradient in backward. Compute per rank
is one apply of ``A`` per hop (``K*K*V`` multiply-adds per head for full transitions) for the
chains and ``P`` applies for the all-gather fold. So All-Gather moves ``P-1`` times more bytes
into each rank, and for the delta rules (``a = H*K*K``) twice that again at ``K = V``, while the
chains pay latency linear in ``P``; All-Scan hides most of it by pipelining blocks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from lsp.parallel import pairs

METHODS = ("allgather", "allscan", "ring")


def check_method(method: str, what: str = "method") -> str:
    """The one check of an exchange method name; raises ``ValueError`` naming the choices."""
    if method not in METHODS:
        raise ValueError(f"{what}={method!r} is unknown; choose one of {METHODS}")
    return method
_FWD_TAG, _BWD_TAG = 0, 1 << 16


# torch >= 2.13 renamed all_gather_into_tensor to all_gather_single (same arguments); the
# device's torch 2.11 has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_rows(flat: Tensor, group) -> Tensor:
    """All-gather a 1-D tensor from every rank of ``group`` into ``[P, n]`` (row = group rank)."""
    P = dist.get_world_size(group)
    out = flat.new_empty(P * flat.numel())  # flat output: gloo rejects a [P, n] one
    _all_gather_single(out, flat.contiguous(), group=group)
    return out.view(P, flat.numel())


def default_num_blocks(P: int, state_bytes: int, V: int, alpha: float = 15e-6,
                       beta: float = 25e9) -> int:
    """All-Scan block count minimising ``(n + P - 2) (alpha + m / (n beta))``.

    ``n* = sqrt((P - 2) m / (alpha beta))`` for a message of ``m`` bytes, latency ``alpha``
    seconds and bandwidth ``beta`` bytes/s (defaults: NCCL over NVLink, measured orders of
    magnitude). Two ranks have one hop, so nothing to pipeline: one block. Clamped to
    ``[1, min(V, 16)]``.
    """
    if P <= 2:
        return 1
    n = math.sqrt((P - 2) * state_bytes / (alpha * beta))
    return max(1, min(V, 16, round(n)))


class _Group:
    """Rank bookkeeping for a process group (point-to-point calls need global ranks)."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def global_rank(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    @property
    def prev(self) -> int:
        return self.global_rank(self.rank - 1)

    @property
    def next(self) -> int:
        return self.global_rank(self.rank + 1)

    @property
    def last(self) -> int:
        return self.global_rank(self.size - 1)


class AllGather:
    """LASP-2: one all-gather of the packed pairs, then a local fold of the prefix."""

    def __init__(self, kind: str, group, need_final: bool):
        self.kind, self.g, self.need_final = kind, _Group(group), need_final

    def forward(self, A, B, S_init):
        P, r, kind = self.g.size, self.g.rank, self.kind
        parts = [B.reshape(-1)] if A is None else [A.reshape(-1), B.reshape(-1)]
        rows = all_gather_rows(torch.cat(parts), self.g.group)
        nA = 0 if A is None else A.numel()
        self.As = [None if A is None else row[:nA].view_as(A) for row in rows]
        Bs = [row[nA:].view_as(B) for row in rows]
        S = torch.zeros_like(B) if S_init is None else S_init
        S_start = S_final = None
        for s in range(P):
            if s == r:
                S_start = S
                if not self.need_final:
                    break
            S = pairs.apply(kind, self.As[s], S) + Bs[s]
        if self.need_final:
            S_final = S
        return S_start, S_final

    def backward(self, G, dS_final):
        P, r, kind = self.g.size, self.g.rank, self.kind
        parts = [G.reshape(-1)] + ([dS_final.reshape(-1)] if self.need_final else [])
        rows = all_gather_rows(torch.cat(parts), self.g.group)
        n = G.numel()
        Gs = [row[:n].view_as(G) for row in rows]
        D = rows[:, n:].sum(0).view_as(G) if self.need_final else torch.zeros_like(G)
        for s in range(P - 1, r, -1):  # the suffix fold: D_{s} = A_s^T D_{s+1} + G_s
            D = pairs.apply_adjoint(kind, self.As[s], D) + Gs[s]
        return D  # D_{r+1}


class AllScan:
    """ZeCO's All-Scan: a pipelined chain of point-to-point messages in blocks along V.

    Rank r receives ``S_start`` block by block from rank r-1, applies its own pair to each block
    and forwards it to rank r+1 at once, so the last rank waits for about one message plus
    ``P-1`` block hops. Blocks along V are independent for every transition kind (``A`` acts on
    the key dim), which is what makes full ``[K, K]`` transitions (the delta rules) pipeline too.
    ``num_blocks=1`` is the plain ring (LASP-1).
    """

    def __init__(self, kind: str, group, need_final: bool, num_blocks: int):
        self.kind, self.g, self.need_final = kind, _Group(group), need_final
        self.num_blocks = num_blocks

    def _chain(self, A, B, first, src, dst, is_first, is_last, adjoint, tag):
        """One pass of the chain; returns (received input, output) states.

        ``first`` is the chain input on the first rank of the chain; others receive it from
        ``src`` block by block, compute ``op(A, x) + B`` per block and send it to ``dst``.
        """
        V = B.shape[-1]
        bounds = [(V * j) // self.num_blocks for j in range(self.num_blocks + 1)]
        spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        recvs = []
        if not is_first:  # post every receive up front so blocks land as soon as they are sent
            for j, (a, b) in enumerate(spans):
                buf = B.new_empty(B.shape[:-1] + (b - a,))
                recvs.append((buf, dist.irecv(buf, src=src, group=self.g.group, tag=tag + j)))
        x_blocks, y_blocks, sends = [], [], []
        f = pairs.apply_adjoint if adjoint else pairs.apply
        for j, (a, b) in enumerate(spans):
            if is_first:
                x = first[..., a:b]
            else:
                x, work = recvs[j]
                work.wait()
            y = f(self.kind, A, x) + B[..., a:b]
            x_blocks.append(x)
            y_blocks.append(y)
            if not is_last:
                y = y.contiguous()
                sends.append(dist.isend(y, dst=dst, group=self.g.group, tag=tag + j))
        for work in sends:
            work.wait()
        return torch.cat(x_blocks, dim=-1), torch.cat(y_blocks, dim=-1)

    def forward(self, A, B, S_init):
        g = self.g
        first = torch.zeros_like(B) if S_init is None else S_init
        S_start, S_end = self._chain(A, B, first, g.prev if g.rank else None,
                                     g.next if g.rank < g.size - 1 else None,
                                     g.rank == 0, g.rank == g.size - 1, False, _FWD_TAG)
        S_final = None
        if self.need_final:
            S_final = S_end.contiguous() if g.rank == g.size - 1 else torch.empty_like(S_end)
            dist.broadcast(S_final, src=g.last, group=g.group)
        self.A = A
        return S_start, S_final

    def backward(self, G, dS_final):
        g = self.g
        if self.need_final:
            D_last = dS_final.contiguous().clone()
            dist.all_reduce(D_last, group=g.group)  # replicated output: sum of its gradients
        else:
            D_last = torch.zeros_like(G)
        # the chain runs from the last rank to the first: D_r = A_r^T D_{r+1} + G_r
        D_next, _ = self._chain(self.A, G, D_last,
                                g.next if g.rank < g.size - 1 else None,
                                g.prev if g.rank else None,
                                g.rank == g.size - 1, g.rank == 0, True, _BWD_TAG)
        return D_next


def make_exchange(method: str, kind: str, group, need_final: bool, num_blocks: int | None,
                  state_bytes: int, V: int):
    """The exchange object for ``method``; raises ``ValueError`` for an unknown method."""
    if method == "allgather":
        return AllGather(kind, group, need_final)
    if method == "ring":
        return AllScan(kind, group, need_final, num_blocks=1)
    if method == "allscan":
        P = dist.get_world_size(group)
        n = default_num_blocks(P, state_bytes, V) if num_blocks is None else num_blocks
        return AllScan(kind, group, need_final, num_blocks=n)
    check_method(method)
