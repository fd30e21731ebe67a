"""Document-causal softmax attention under CP with the balanced layout (packed documents).

The same work split as :func:`lsp.parallel.cp_attention.balanced_causal_attention` (ranks pair up
as ``(r, P-1-r)`` and the busier one hands the first rows of its queries to its partner). Each
partial block (full, or square causal on the diagonal) is cut along the documents, from the
global offsets that every rank holds: the part of a document in both the block's rows and its
keys is again a full block (its keys all come before its queries) or a square causal one, so it
runs on the same fused kernels as unpacked attention (``cp_attention.attention_forward``, the
backend resolved once), and rows of no document in the block's keys keep ``out = 0``,
``lse = -inf``. Partials merge by their log-sum-exp; every query sees itself in its diagonal
block, so the merged log-sum-exp is finite. The backward runs each document part's attention
backward with the merged output and log-sum-exp, as the unmasked form does.
"""

from __future__ import annotations

import bisect

import torch
import torch.distributed as dist
from torch import Tensor

from lsp.kernels.offsets import cached_on, host_offsets
from lsp.parallel.cp_attention import (
    _acc,
    _blocks,
    _exchange,
    _merge,
    attention_backward,
    attention_forward,
    balance_plan,
    resolve_backend,
)


def _merged(parts: list[tuple[Tensor, Tensor]], dtype) -> tuple[Tensor, Tensor]:
    """The merge of partials ``(out, lse)`` over disjoint key sets, as new tensors (the output
    in ``dtype``); ``cp_attention._merge`` writes the same into given buffers."""
    p0 = parts[0]
    out = torch.empty(p0[0].shape, dtype=dtype, device=p0[0].device)
    lse = torch.empty_like(p0[1])
    _merge(parts, out, lse)
    return out, lse


__all__ = ["balanced_document_attention", "document_block_forward", "document_block_backward",
           "square_groups", "groups_to_device", "batch_rows", "group_batch", "real_rows",
           "to_device", "cached_tables"]


def cached_tables(rows_cu: list[Tensor], key: tuple, build):
    """``build()`` once per offsets and ``key``: the layers of a step share the offsets, so the
    index tables of packed attention are built on the host and copied to the device once per
    step, not once per layer call (kept beside the first row's offsets, ``offsets.cached_on``)."""
    return cached_on(rows_cu[0], key + tuple(host_offsets(r) for r in rows_cu[1:]), build)


def _bucket(n: int) -> int:
    """The length bucket of a part of ``n`` rows: ``n`` rounded up to a quarter octave (four
    buckets per power of two), so a part is padded by less than a quarter of its length."""
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return -(-n // step) * step


def square_groups(parts: list[tuple[int, int, int]]) -> list[tuple]:
    """Square causal document parts grouped by length, for one batched kernel call per group.

    ``parts``: ``(first query row, first key row, length)`` in flat token rows. The parts of a
    length bucket (:func:`_bucket`) run as one batch ``[m, L]`` with ``L`` the longest part's
    length (at least 2: cuDNN refuses a single key), each part padded at its end with zero rows:
    causality keeps the padding unseen by the real queries, and the padded queries' outputs are
    dropped. Per group ``(query rows [n], key rows [n], slots, m, L, q0, k0)``: the real rows,
    int64 on the host, unique (so that no gradient is scattered twice into one row); ``slots``
    [n] their places in the flattened ``[m * L]`` batch, ``None`` where no part is padded (the
    batch is the rows in order); ``q0, k0`` the first rows when the group is one unpadded part
    (the batch is then a slice, no copy), else ``None``. See :func:`batch_rows`.
    """
    by_bucket: dict[int, list[tuple[int, int, int]]] = {}
    for part in parts:
        by_bucket.setdefault(_bucket(part[2]), []).append(part)
    groups = []
    for _, ps in sorted(by_bucket.items()):
        L = max(2, max(n for _, _, n in ps))
        qi = torch.cat([torch.arange(a, a + n) for a, _, n in ps])
        ki = torch.cat([torch.arange(b, b + n) for _, b, n in ps])
        padded = any(n != L for _, _, n in ps)
        slots = torch.cat([i * L + torch.arange(n) for i, (_, _, n) in enumerate(ps)]) \
            if padded else None
        one = len(ps) == 1 and not padded
        groups.append((qi, ki, slots, len(ps), L, ps[0][0] if one else None,
                       ps[0][1] if one else None))
    return groups


def groups_to_device(groups: list[tuple], dev: torch.device) -> list[tuple]:
    """:func:`square_groups`' tables with their index tensors on ``dev``."""
    return [tuple(to_device(x, dev) if isinstance(x, Tensor) else x for x in g) for g in groups]


def batch_rows(x: Tensor, rows: Tensor, slots, m: int, L: int, first) -> Tensor:
    """The ``[m, L, ...]`` batch of a square group from token rows ``x [N, ...]``: a slice
    when the group is one unpadded part starting at row ``first``, the gathered ``rows`` when no
    part is padded, else the rows placed at ``slots`` of a zero batch (a copy to unique places,
    whose backward is a gather: no scattered adds)."""
    if first is not None:
        return x[first:first + L].unsqueeze(0)
    got = x[rows]
    if slots is None:
        return got.view((m, L) + x.shape[1:])
    return x.new_zeros((m * L,) + x.shape[1:]).index_copy(0, slots, got).view((m, L) + x.shape[1:])


def group_batch(x: Tensor, group: tuple, keys: bool = False) -> Tensor:
    """A square group's (:func:`square_groups`) batch of token rows ``x [N, H, ...]`` as
    ``[m, H, L, ...]``: its query rows, or its key rows (``keys``)."""
    qi, ki, slots, m, L, q0, k0 = group
    return batch_rows(x, ki if keys else qi, slots, m, L, k0 if keys else q0).transpose(1, 2)


def real_rows(y: Tensor, slots) -> Tensor:
    """The real parts' rows of a batch ``y [m, L, ...]`` (the padded rows dropped)."""
    flat = y.reshape((-1,) + y.shape[2:])
    return flat if slots is None else flat[slots]


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A host index table on ``device``, pinned and asynchronous (no wait for the GPU)."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x


def _rows(x: Tensor) -> Tensor:
    """``[B, H, T, ...]`` as token rows ``[B * T, H, ...]``."""
    return x.transpose(1, 2).reshape((x.shape[0] * x.shape[2], x.shape[1]) + x.shape[3:])


def _parts(rows_cu: list[Tensor], q0: int, Tq: int, k0: int, Sk: int, causal: bool) -> list:
    """The document parts of a block of queries ``[q0, q0 + Tq)`` over keys ``[k0, k0 + Sk)``
    (global positions): ``(row, query slice, key slice)`` in block-local indices. A full block's
    keys all precede its queries; a causal block is square on the diagonal (``q0 == k0``)."""
    if causal and (q0, Tq) != (k0, Sk):
        raise ValueError(f"a causal partial must be square on the diagonal, got queries "
                         f"[{q0}, {q0 + Tq}) over keys [{k0}, {k0 + Sk})")
    parts = []
    for b, cu in enumerate(rows_cu):
        offs = host_offsets(cu)
        i = bisect.bisect_right(offs, q0) - 1
        while i < len(offs) - 1 and offs[i] < q0 + Tq:
            s, e = offs[i], offs[i + 1]
            qa, qb, ka, kb = max(s, q0), min(e, q0 + Tq), max(s, k0), min(e, k0 + Sk)
            if qa < qb and ka < kb:
                parts.append((b, slice(qa - q0, qb - q0), slice(ka - k0, kb - k0)))
            i += 1
    return parts


def document_block_forward(q: Tensor, k: Tensor, v: Tensor, rows_cu: list[Tensor], q0: int,
                           k0: int, causal: bool, backend: str):
    """``(out, lse, saved)`` of the queries ``q [B,H,Tq,d]`` at global ``q0`` over the keys
    ``k, v [B,H,Sk,d]`` at ``k0``, each query over the keys of its own document only; a row
    with no such key gives ``out = 0``, ``lse = -inf``."""
    B, H, Tq, d = q.shape
    Sk, dev = k.shape[2], q.device
    if causal:  # the diagonal block's documents, grouped by length
        def groups():
            parts = _parts(rows_cu, q0, Tq, k0, Sk, causal)
            return groups_to_device(square_groups(
                [(b * Tq + qs.start, b * Tq + qs.start, qs.stop - qs.start)
                 for b, qs, _ in parts]), dev)
        return _square_forward(q, k, v, cached_tables(
            rows_cu, ("doc_square", q0, Tq, str(dev)), groups), backend)
    parts = cached_tables(rows_cu, ("doc_parts", q0, Tq, k0, Sk),
                          lambda: _parts(rows_cu, q0, Tq, k0, Sk, causal))
    out = torch.zeros_like(q)
    lse = torch.full((B, H, Tq), float("-inf"), dtype=_acc(q.dtype), device=q.device)
    states = []
    for b, qs, ks in parts:
        o, l, st = attention_forward(q[b:b + 1, :, qs], k[b:b + 1, :, ks], v[b:b + 1, :, ks],
                                     causal, _full_part_backend(backend, ks))
        out[b:b + 1, :, qs] = o
        lse[b:b + 1, :, qs] = l
        states.append(st)
    return out, lse, (parts, states, causal)


def _full_part_backend(backend: str, ks: slice) -> str:
    """The kernel of a full document part: ``backend``, except that a part of one key (a
    document with a single token among the block's keys) runs the explicit formula, which is
    exact and holds only its ``[Tq, 1]`` scores: torch's cuDNN attention refuses a single key."""
    return "math" if backend == "cudnn" and ks.stop - ks.start == 1 else backend


def document_block_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                            lse: Tensor, saved, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of one block given the merged output and log-sum-exp."""
    parts, states, causal = saved
    if causal:
        return _square_backward(do, q, k, v, out, lse, saved, backend)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (b, qs, ks), st in zip(parts, states):
        g = attention_backward(do[b:b + 1, :, qs], q[b:b + 1, :, qs], k[b:b + 1, :, ks],
                               v[b:b + 1, :, ks], out[b:b + 1, :, qs], lse[b:b + 1, :, qs],
                               causal, st, _full_part_backend(backend, ks))
        dq[b:b + 1, :, qs] += g[0]
        dk[b:b + 1, :, ks] += g[1]
        dv[b:b + 1, :, ks] += g[2]
    return dq, dk, dv


def _square_forward(q: Tensor, k: Tensor, v: Tensor, groups: list, backend: str):
    """:func:`document_block_forward` of a diagonal block: every document part is square
    causal; the parts of one length bucket (``groups``, :func:`square_groups` on ``q``'s
    device) run as one batch."""
    B, H, T, d = q.shape
    dev = q.device
    qf, kf, vf = _rows(q), _rows(k), _rows(v)
    out = q.new_zeros(B * T, H, d)
    lse = torch.full((B * T, H), float("-inf"), dtype=_acc(q.dtype), device=dev)
    states = []
    for g in groups:
        qi, slots = g[0], g[2]
        o, l, st = attention_forward(group_batch(qf, g), group_batch(kf, g, keys=True),
                                     group_batch(vf, g, keys=True), True, backend)
        out[qi] = real_rows(o.transpose(1, 2), slots)
        lse[qi] = real_rows(l.transpose(1, 2), slots)
        states.append(st)
    return (out.view(B, T, H, d).transpose(1, 2), lse.view(B, T, H).transpose(1, 2),
            (groups, states, True))


def _square_backward(do, q, k, v, out, lse, saved, backend):
    """:func:`document_block_backward` of a diagonal block (grouped as in the forward). The
    padded rows are zero (their output gradient too), so they add nothing to the real rows'
    gradients and need a finite log-sum-exp only, which the zero padding gives."""
    groups, states, _ = saved
    B, H, T, d = q.shape
    qf, kf, vf, dof, of = _rows(q), _rows(k), _rows(v), _rows(do), _rows(out)
    lf = _rows(lse.unsqueeze(-1)).squeeze(-1)
    dq, dk, dv = (torch.zeros(B * T, H, d, dtype=x.dtype, device=x.device) for x in (q, k, v))
    for grp, st in zip(groups, states):
        qi, ki, slots = grp[:3]
        qb, ob, dob, lb = (group_batch(x, grp) for x in (qf, of, dof, lf))
        kb, vb = (group_batch(x, grp, keys=True) for x in (kf, vf))
        g = attention_backward(dob, qb, kb, vb, ob, lb, True, st, backend)
        for acc, rows, grad in ((dq, qi, g[0]), (dk, ki, g[1]), (dv, ki, g[2])):
            acc.index_add_(0, rows, real_rows(grad.transpose(1, 2), slots))
    return tuple(x.view(B, T, H, d).transpose(1, 2) for x in (dq, dk, dv))


class _BalancedDocumentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, K, V, rows_cu, group, backend):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        B, H, T, d = q.shape
        p = P - 1 - r
        moved = balance_plan(P, T)
        n_out, n_in = moved[r], (moved[p] if p != r else 0)
        base = r * T
        parts, saved = {}, []
        for rows, keys, causal in _blocks(r, T, n_out):
            o, lse, st = document_block_forward(q[:, :, rows], K[:, :, keys], V[:, :, keys],
                                                rows_cu, base + rows.start, keys.start, causal,
                                                backend)
            parts.setdefault((rows.start, rows.stop), []).append((o, lse))
            saved.append((rows, keys, st))
        q_in = saved_in = None
        if n_in:  # the partner's moved rows against the partner's full blocks
            q_in = q.new_empty(B, H, n_in, d)
            _exchange(group, p, [], [q_in])
            o_in, lse_in, saved_in = document_block_forward(
                q_in, K[:, :, : p * T], V[:, :, : p * T], rows_cu, p * T, 0, False, backend)
            _exchange(group, p, [o_in, lse_in], [])
        elif n_out:
            o_far = q.new_empty(B, H, n_out, d)
            lse_far = torch.empty(B, H, n_out, dtype=_acc(q.dtype), device=q.device)
            _exchange(group, p, [q[:, :, :n_out]], [])
            _exchange(group, p, [], [o_far, lse_far])
            parts[(0, n_out)].append((o_far, lse_far))
        outs, lses = [], []
        for key in sorted(parts):
            o, lse = _merged(parts[key], q.dtype)
            outs.append(o)
            lses.append(lse)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.group, ctx.blocks, ctx.n, ctx.saved_in = group, saved, (n_out, n_in, p), saved_in
        ctx.backend = backend
        ctx.save_for_backward(q, K, V, out, lse, q_in)
        return out

    @staticmethod
    def backward(ctx, do):
        q, K, V, out, lse, q_in = ctx.saved_tensors
        n_out, n_in, p = ctx.n
        T = q.shape[2]
        do = do.contiguous()
        dq, dK, dV = torch.zeros_like(q), torch.zeros_like(K), torch.zeros_like(V)
        for rows, keys, st in ctx.blocks:
            g = document_block_backward(do[:, :, rows], q[:, :, rows], K[:, :, keys],
                                        V[:, :, keys], out[:, :, rows], lse[:, :, rows], st,
                                        ctx.backend)
            dq[:, :, rows] += g[0]
            dK[:, :, keys] += g[1]
            dV[:, :, keys] += g[2]
        if n_in:
            do_in, o_merged = torch.empty_like(q_in), torch.empty_like(q_in)
            lse_merged = q_in.new_empty(q_in.shape[:3], dtype=_acc(q.dtype))
            _exchange(ctx.group, p, [], [do_in, o_merged, lse_merged])
            pt = p * T
            g = document_block_backward(do_in, q_in, K[:, :, :pt], V[:, :, :pt], o_merged,
                                        lse_merged, ctx.saved_in, ctx.backend)
            dK[:, :, :pt] += g[1]
            dV[:, :, :pt] += g[2]
            _exchange(ctx.group, p, [g[0]], [])
        elif n_out:
            _exchange(ctx.group, p, [do[:, :, :n_out], out[:, :, :n_out], lse[:, :, :n_out]], [])
            dq_far = q.new_empty(q.shape[:2] + (n_out, q.shape[3]))
            _exchange(ctx.group, p, [], [dq_far])
            dq[:, :, :n_out] += dq_far
        return dq, dK, dV, None, None, None


def balanced_document_attention(q: Tensor, K: Tensor, V: Tensor, rows_cu: list[Tensor],
                                group, backend: str = "auto") -> Tensor:
    """Document-causal attention of this CP rank's queries ``q [B, H, T, d]`` over the gathered
    ``K, V [B, H, P T, d]``, the work balanced over the ranks as in the unmasked form;
    ``rows_cu``: each row's GLOBAL document offsets; ``backend``: the kernel of every document
    part (full or square causal: cuDNN or flash under ``auto``). Returns ``[B, H, T, d]``."""
    T = q.shape[2]
    backend = resolve_backend(backend, [(q, K[:, :, :T], True), (q, K, False)])
    return _BalancedDocumentAttention.apply(q, K, V, rows_cu, group, backend)
