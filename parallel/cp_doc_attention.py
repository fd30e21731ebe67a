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
           "square_groups", "to_device", "cached_tables"]


def cached_tables(rows_cu: list[Tensor], key: tuple, build):
    """``build()`` once per offsets and ``key``: the layers of a step share the offsets, so the
    index tables of packed attention are built on the host and copied to the device once per
    step, not once per layer call (kept beside the first row's offsets, ``offsets.cached_on``)."""
    return cached_on(rows_cu[0], key + tuple(host_offsets(r) for r in rows_cu[1:]), build)


def square_groups(parts: list[tuple[int, int, int]]) -> list[tuple[Tensor, ...]]:
    """Square causal document parts grouped by length, for one batched kernel call per group.

    ``parts``: ``(first query row, first key row, length)`` in flat token rows. Per length
    rounded up to a power of two ``L``: ``(query rows [m, L], key rows [m, L], kept [n] (the
    real entries of the flattened ``[m * L]``), their query rows [n])``, int64 on the host. A
    part is padded at its end by repeating its last row: causality keeps the padding unseen by
    the real queries, and padded queries are dropped (their output gradient is zero).
    """
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for part in parts:
        by_length.setdefault(1 << (part[2] - 1).bit_length(), []).append(part)
    groups = []
    for L, ps in sorted(by_length.items()):
        ar = torch.arange(L)
        n = torch.tensor([x[2] for x in ps])
        step = torch.minimum(ar[None, :], n[:, None] - 1)
        qi = torch.tensor([x[0] for x in ps])[:, None] + step
        ki = torch.tensor([x[1] for x in ps])[:, None] + step
        kept = (ar[None, :] < n[:, None]).flatten().nonzero().flatten()
        groups.append((qi, ki, kept, qi.flatten()[kept]))
    return groups


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
            return [tuple(to_device(x, dev) for x in g) for g in square_groups(
                [(b * Tq + qs.start, b * Tq + qs.start, qs.stop - qs.start)
                 for b, qs, _ in parts])]
        return _square_forward(q, k, v, cached_tables(
            rows_cu, ("doc_square", q0, Tq, str(dev)), groups), backend)
    parts = cached_tables(rows_cu, ("doc_parts", q0, Tq, k0, Sk),
                          lambda: _parts(rows_cu, q0, Tq, k0, Sk, causal))
    out = torch.zeros_like(q)
    lse = torch.full((B, H, Tq), float("-inf"), dtype=_acc(q.dtype), device=q.device)
    states = []
    for b, qs, ks in parts:
        o, l, st = attention_forward(q[b:b + 1, :, qs], k[b:b + 1, :, ks], v[b:b + 1, :, ks],
                                     causal, backend)
        out[b:b + 1, :, qs] = o
        lse[b:b + 1, :, qs] = l
        states.append(st)
    return out, lse, (parts, states, causal)


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
                               causal, st, backend)
        dq[b:b + 1, :, qs] += g[0]
        dk[b:b + 1, :, ks] += g[1]
        dv[b:b + 1, :, ks] += g[2]
    return dq, dk, dv


def _square_forward(q: Tensor, k: Tensor, v: Tensor, groups: list, backend: str):
    """:func:`document_block_forward` of a diagonal block: every document part is square
    causal; the parts of one padded length (``groups``, :func:`square_groups` on ``q``'s
    device) run as one batch."""
    B, H, T, d = q.shape
    dev = q.device
    qf, kf, vf = _rows(q), _rows(k), _rows(v)
    out = q.new_zeros(B * T, H, d)
    lse = torch.full((B * T, H), float("-inf"), dtype=_acc(q.dtype), device=dev)
    states = []
    for qi, ki, kept, real in groups:
        o, l, st = attention_forward(qf[qi].transpose(1, 2), kf[ki].transpose(1, 2),
                                     vf[ki].transpose(1, 2), True, backend)
        out[real] = _rows(o)[kept]
        lse[real] = _rows(l.unsqueeze(-1))[kept].squeeze(-1)
        states.append(st)
    return (out.view(B, T, H, d).transpose(1, 2), lse.view(B, T, H).transpose(1, 2),
            (groups, states, True))


def _square_backward(do, q, k, v, out, lse, saved, backend):
    """:func:`document_block_backward` of a diagonal block (grouped as in the forward)."""
    groups, states, _ = saved
    B, H, T, d = q.shape
    qf, kf, vf, dof, of = _rows(q), _rows(k), _rows(v), _rows(do), _rows(out)
    lf = _rows(lse.unsqueeze(-1)).squeeze(-1)
    dq, dk, dv = (torch.zeros(B * T, H, d, dtype=x.dtype, device=x.device) for x in (q, k, v))
    for (qi, ki, kept, real), st in zip(groups, states):
        m, L = qi.shape
        live = torch.zeros(m * L, dtype=do.dtype, device=do.device)
        live[kept] = 1.0  # padded queries get no output gradient
        g = attention_backward((dof[qi] * live.view(m, L, 1, 1)).transpose(1, 2),
                               qf[qi].transpose(1, 2), kf[ki].transpose(1, 2),
                               vf[ki].transpose(1, 2), of[qi].transpose(1, 2),
                               lf[qi].transpose(1, 2), True, st, backend)
        dq.index_add_(0, real, _rows(g[0])[kept])
        dk.index_add_(0, ki.flatten(), _rows(g[1]))
        dv.index_add_(0, ki.flatten(), _rows(g[2]))
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
