"""Causal softmax attention over a contiguous CP layout, with the work balanced over the ranks.

With the sequence in contiguous shards (the layout the recurrent layers need), rank ``r`` of ``P``
holds queries ``[r T, (r+1) T)`` and attends ``r`` full key blocks plus one causal diagonal block:
``r + 1/2`` units of work (a unit is ``T x T`` scores), so the last rank does ``2P - 1`` times the
first rank's work and sets the step time. Here ranks pair up as ``(r, P-1-r)``; each pair holds
``P`` units, and the busier rank ``hi`` hands the first ``n`` rows of its queries to its partner
``lo``, which scores them against the full blocks ``[0, hi T)`` (it has every key: K and V are
all-gathered over CP before, as in LASP-2H) and sends back the partial output and its log-sum-exp.
``n = T (hi - lo) / (2 hi)`` gives both ranks of a pair ``P / 2`` units (the middle rank of an odd
``P`` keeps its own ``(P - 1)/2 + 1/2``).

Every partial is a full block (no mask) or a square causal block, so the result does not depend on
how a kernel aligns a non-square causal mask. Partials merge by their log-sum-exp in float32. The
backward runs each partial's flash-attention backward with the *merged* output and log-sum-exp
(exact for attention over the union of key sets, as in ring attention): ``hi`` sends the moved
rows' output gradient, output and log-sum-exp to ``lo`` and receives their query gradient; key and
value gradients land in the gathered K/V gradient, which the all-gather's backward
reduce-scatters.

Written by hand: torch has no context-parallel attention for a contiguous causal layout with load
balancing (its ``context_parallel`` uses a round-robin layout that the recurrences cannot use).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["balanced_causal_attention", "balance_plan", "flash_forward", "flash_backward"]


def balance_plan(P: int, T: int) -> list[int]:
    """Rows each rank hands to its partner (``> 0`` on the busier rank of a pair, else 0)."""
    moved = []
    for r in range(P):
        p = P - 1 - r
        moved.append(round(T * (r - p) / (2 * r)) if r > p else 0)
    return moved


def rank_work(P: int, T: int, r: int) -> float:
    """Scores a rank computes under the plan, in units of ``T x T`` (square causal = 1/2)."""
    moved = balance_plan(P, T)
    n = moved[r] / T
    work = r + 0.5 - n * r  # its own rows minus the moved rows' full blocks
    p = P - 1 - r
    if p > r:
        work += moved[p] / T * p  # the partner's rows against the partner's full blocks
    return work


# ------------------------------------------------------------------------------- flash kernels
def flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor, tuple]:
    """``(out, lse [B, H, Tq] float32, state for backward)`` of one block; ``[B, H, T, d]`` inputs.
    ``causal`` only for square blocks."""
    if q.is_cuda:
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
        out, lse = r[0], r[1]
        return out, lse, (r[2], r[3], r[4], r[5], r[6], r[7])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal)
    return out, lse, ()


def flash_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   causal: bool, state: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of one block given the output and log-sum-exp of the merged attention."""
    if q.is_cuda:
        # q, k, v, out, do may be strided views along the sequence (the kernel takes strides);
        # the log-sum-exp is indexed as a dense [B, H, Tq] array
        cq, ck, mq, mk, seed, offset = state
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse.contiguous(), cq, ck, mq, mk, 0.0, causal, seed, offset)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
        lse.contiguous(), 0.0, causal)


def _acc(dtype) -> torch.dtype:
    """Accumulation dtype (also the kernels' log-sum-exp dtype): float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge(parts: list[tuple[Tensor, Tensor]], dtype) -> tuple[Tensor, Tensor]:
    if len(parts) == 1:
        return parts[0][0].to(dtype), parts[0][1]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    out = sum(p[0].to(_acc(dtype)) * torch.exp(p[1] - lse).unsqueeze(-1) for p in parts)
    return out.to(dtype), lse


def _start(group, partner: int, send: list[Tensor], recv: list[Tensor],
           wait: bool = False) -> list:
    """Start sending ``send`` to and receiving ``recv`` from the partner rank of ``group`` in one
    batch; returns ``[(work, tensors)]`` to pass to :func:`_finish` (the tensors stay referenced
    until then), or ``[]`` after waiting for them here when ``wait``."""
    peer = dist.get_global_rank(group, partner)
    send = [t.contiguous() for t in send]
    ops = [dist.P2POp(dist.isend, t, peer, group) for t in send]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for t in recv]
    pending = [(w, send + recv) for w in dist.batch_isend_irecv(ops)] if ops else []
    if wait:
        _finish(pending)
        return []
    return pending


def _finish(pending: list) -> None:
    """Wait for started transfers (on NCCL: the current stream waits; the host does not)."""
    for w, _ in pending:
        w.wait()


def _exchange(group, partner: int, send: list[Tensor], recv: list[Tensor]) -> None:
    """Send ``send`` to and receive ``recv`` from the partner rank of ``group``, in one batch."""
    _start(group, partner, send, recv, wait=True)


def _blocks(r: int, T: int, n: int):
    """This rank's own partials as ``(row slice, key slice, causal)``; rows ``[:n]`` are moved."""
    rows_keep, rows_moved = slice(n, T), slice(0, n)
    base = r * T
    blocks = []
    if r > 0:
        blocks.append((rows_keep, slice(0, base), False))
    if n > 0:
        blocks.append((rows_keep, slice(base, base + n), False))
        blocks.append((rows_moved, slice(base, base + n), True))
    blocks.append((rows_keep, slice(base + n, base + T), True))
    return blocks


class _BalancedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, K, V, group, overlap):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        B, H, T, d = q.shape
        p = P - 1 - r
        moved = balance_plan(P, T)
        n_out, n_in = moved[r], (moved[p] if p != r else 0)
        parts = {}  # row slice key -> list of (out, lse)
        saved = []  # (rows, keys, causal, state) of every own partial

        def own_blocks():
            for rows, keys, causal in _blocks(r, T, n_out):
                o, lse, st = flash_forward(q[:, :, rows], K[:, :, keys], V[:, :, keys], causal)
                parts.setdefault((rows.start, rows.stop), []).append((o, lse))
                saved.append((rows, keys, causal, st))

        q_in = st_in = None
        pending = []
        if not overlap:  # serial order: own blocks, then the exchange
            own_blocks()
        # the partner's moved rows (we are lo) against the partner's full blocks
        if n_in:
            q_in = q.new_empty(B, H, n_in, d)
            _exchange(group, p, [], [q_in])
            o_in, lse_in, st_in = flash_forward(q_in, K[:, :, : p * T], V[:, :, : p * T], False)
            # lse: float32 (float64) from the kernel
            pending = _start(group, p, [o_in, lse_in], [])
        elif n_out:
            o_far = q.new_empty(B, H, n_out, d)
            lse_far = torch.empty(B, H, n_out, dtype=_acc(q.dtype), device=q.device)
            # serial order (as measured on the GPUs): the send is done before the receive starts
            pending = _start(group, p, [q[:, :, :n_out]], [], wait=not overlap)
            pending += _start(group, p, [], [o_far, lse_far])
        if overlap:  # the partner works on the moved rows while we score our own blocks
            own_blocks()
        _finish(pending)
        if n_out and not n_in:
            parts[(0, n_out)].append((o_far, lse_far))
        outs, lses = [], []
        for key in sorted(parts):
            o, lse = _merge(parts[key], q.dtype)
            outs.append(o)
            lses.append(lse)
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        lse = torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]
        ctx.group, ctx.blocks, ctx.n, ctx.overlap = group, saved, (n_out, n_in, p), overlap
        ctx.st_in = st_in
        ctx.save_for_backward(q, K, V, out, lse, q_in)
        return out

    @staticmethod
    def backward(ctx, do):
        q, K, V, out, lse, q_in = ctx.saved_tensors
        n_out, n_in, p = ctx.n
        T = q.shape[2]
        do = do.contiguous()
        # gradients accumulate in the inputs' dtype: a key block gets at most three partials,
        # each already rounded to that dtype by the flash backward (float32 buffers would be 4 GB
        # more per tensor at 1M keys)
        dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        dK = torch.zeros(K.shape, dtype=K.dtype, device=K.device)
        dV = torch.zeros(V.shape, dtype=V.dtype, device=V.device)

        def own_blocks():
            for rows, keys, causal, st in ctx.blocks:
                g = flash_backward(do[:, :, rows], q[:, :, rows], K[:, :, keys], V[:, :, keys],
                                   out[:, :, rows], lse[:, :, rows], causal, st)
                dq[:, :, rows] += g[0]
                dK[:, :, keys] += g[1]
                dV[:, :, keys] += g[2]

        pending, dq_far = [], None
        if not ctx.overlap:
            own_blocks()
        if n_in:  # lo: the partner's rows, with the partner's merged output and lse
            do_in = torch.empty_like(q_in)
            o_merged = torch.empty_like(q_in)
            # the log-sum-exp travels in the accumulation dtype (float32 for bf16 inputs)
            lse_merged = q_in.new_empty(q_in.shape[:3], dtype=_acc(q.dtype))
            _exchange(ctx.group, p, [], [do_in, o_merged, lse_merged])
            pt = p * T
            g = flash_backward(do_in, q_in, K[:, :, :pt], V[:, :, :pt], o_merged, lse_merged,
                               False, ctx.st_in)
            dK[:, :, :pt] += g[1]
            dV[:, :, :pt] += g[2]
            pending = _start(ctx.group, p, [g[0]], [])
        elif n_out:  # hi: the moved rows' gradient comes back from the partner
            pending = _start(ctx.group, p,
                             [do[:, :, :n_out], out[:, :, :n_out], lse[:, :, :n_out]], [],
                             wait=not ctx.overlap)
            dq_far = q.new_empty(q.shape[:2] + (n_out, q.shape[3]))
            pending += _start(ctx.group, p, [], [dq_far])
        if ctx.overlap:  # the partner works on the moved rows while we run our own blocks
            own_blocks()
        _finish(pending)
        if dq_far is not None:
            dq[:, :, :n_out] += dq_far
        return dq, dK, dV, None, None


def balanced_causal_attention(q: Tensor, K: Tensor, V: Tensor, group,
                              overlap: bool = False) -> Tensor:
    """Causal attention of this CP rank's queries ``q [B, H, T, d]`` over the gathered keys and
    values ``K, V [B, H, P T, d]`` (every rank's shard, rank order), the work balanced over the
    ranks (see the module doc). Returns ``[B, H, T, d]``.

    ``overlap=False`` runs each rank's own blocks first and exchanges the moved rows after,
    which serialises a pair: ``lo`` waits for ``hi``'s own blocks before it can score ``hi``'s
    rows, and ``hi`` then waits for those. ``overlap=True`` starts the exchange first: ``hi``
    sends its moved rows and posts the receive of their results before its own blocks, ``lo``
    scores them first and sends them back while it runs its own blocks; forward and backward
    alike. Same results, less waiting (docs/results.md)."""
    return _BalancedAttention.apply(q, K, V, group, overlap)
