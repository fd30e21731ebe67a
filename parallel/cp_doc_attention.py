"""Document-causal softmax attention under CP with the balanced layout (packed documents).

The same work split as :func:`lsp.parallel.cp_attention.balanced_causal_attention` (ranks pair up
as ``(r, P-1-r)`` and the busier one hands the first rows of its queries to its partner), with
every partial block masked to the pairs in one document and at or before the query
(block-diagonal causal), from the global document offsets that every rank holds. Partials merge
by their log-sum-exp; a query may see no key of its document in a partial block (its log-sum-exp
is then ``-inf`` and it adds nothing), but always sees itself in its diagonal block, so the
merged log-sum-exp is finite. The backward runs each partial's attention backward with the merged
output and log-sum-exp, as the unmasked form does.

The blocks are scored with explicit masks in plain torch (written by hand: torch's fused
kernels take no per-pair mask with a log-sum-exp output); this is the CPU / reference path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lsp.parallel.cp_attention import _acc, _blocks, _exchange, _merge, balance_plan
from lsp.parallel.packed import document_ids


def _merged(parts: list[tuple[Tensor, Tensor]], dtype) -> tuple[Tensor, Tensor]:
    """The merge of partials ``(out, lse)`` over disjoint key sets, as new tensors (the output
    in ``dtype``); ``cp_attention._merge`` writes the same into given buffers."""
    p0 = parts[0]
    out = torch.empty(p0[0].shape, dtype=dtype, device=p0[0].device)
    lse = torch.empty_like(p0[1])
    _merge(parts, out, lse)
    return out, lse

__all__ = ["balanced_document_attention", "masked_forward", "masked_backward"]


def _block_mask(rows_cu: list[Tensor], q0: int, Tq: int, k0: int, Tk: int,
                device) -> Tensor:
    """``[B, 1, Tq, Tk]``: query ``q0 + i`` may see key ``k0 + j`` (same document, not later)."""
    qpos = torch.arange(q0, q0 + Tq)
    kpos = torch.arange(k0, k0 + Tk)
    causal = kpos[None, :] <= qpos[:, None]
    masks = [(document_ids(cu.cpu(), q0, Tq)[:, None] == document_ids(cu.cpu(), k0, Tk)[None, :])
             & causal for cu in rows_cu]
    return torch.stack(masks)[:, None].to(device)


def masked_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of attention of ``q [B,H,Tq,d]`` over ``k, v [B,H,Tk,d]`` where ``mask``
    (``[B,1,Tq,Tk]`` bool) allows; a row with no allowed key gives ``out = 0``, ``lse = -inf``."""
    acc = _acc(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    return (p @ v.to(acc)).to(q.dtype), lse


def masked_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of one masked block given the merged output and log-sum-exp."""
    acc, scale = _acc(q.dtype), q.shape[-1] ** -0.5
    qa, ka, va, doa = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    s = (qa @ ka.transpose(-1, -2)) * scale
    p = torch.exp(s.masked_fill(~mask, float("-inf")) - lse.unsqueeze(-1))
    dv = p.transpose(-1, -2) @ doa
    dp = doa @ va.transpose(-1, -2)
    ds = p * (dp - (doa * out.to(acc)).sum(-1, keepdim=True))
    dq = (ds @ ka) * scale
    dk = (ds.transpose(-1, -2) @ qa) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _BalancedDocumentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, K, V, rows_cu, group):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        B, H, T, d = q.shape
        p = P - 1 - r
        moved = balance_plan(P, T)
        n_out, n_in = moved[r], (moved[p] if p != r else 0)
        base = r * T
        parts, saved = {}, []
        for rows, keys, _ in _blocks(r, T, n_out):
            mask = _block_mask(rows_cu, base + rows.start, rows.stop - rows.start, keys.start,
                               keys.stop - keys.start, q.device)
            o, lse = masked_forward(q[:, :, rows], K[:, :, keys], V[:, :, keys], mask)
            parts.setdefault((rows.start, rows.stop), []).append((o, lse))
            saved.append((rows, keys, mask))
        q_in = mask_in = None
        if n_in:  # the partner's moved rows against the partner's full blocks
            q_in = q.new_empty(B, H, n_in, d)
            _exchange(group, p, [], [q_in])
            mask_in = _block_mask(rows_cu, p * T, n_in, 0, p * T, q.device)
            o_in, lse_in = masked_forward(q_in, K[:, :, : p * T], V[:, :, : p * T], mask_in)
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
        ctx.group, ctx.blocks, ctx.n, ctx.mask_in = group, saved, (n_out, n_in, p), mask_in
        ctx.save_for_backward(q, K, V, out, lse, q_in)
        return out

    @staticmethod
    def backward(ctx, do):
        q, K, V, out, lse, q_in = ctx.saved_tensors
        n_out, n_in, p = ctx.n
        T = q.shape[2]
        do = do.contiguous()
        dq, dK, dV = torch.zeros_like(q), torch.zeros_like(K), torch.zeros_like(V)
        for rows, keys, mask in ctx.blocks:
            g = masked_backward(do[:, :, rows], q[:, :, rows], K[:, :, keys], V[:, :, keys],
                                out[:, :, rows], lse[:, :, rows], mask)
            dq[:, :, rows] += g[0]
            dK[:, :, keys] += g[1]
            dV[:, :, keys] += g[2]
        if n_in:
            do_in, o_merged = torch.empty_like(q_in), torch.empty_like(q_in)
            lse_merged = q_in.new_empty(q_in.shape[:3], dtype=_acc(q.dtype))
            _exchange(ctx.group, p, [], [do_in, o_merged, lse_merged])
            pt = p * T
            g = masked_backward(do_in, q_in, K[:, :, :pt], V[:, :, :pt], o_merged, lse_merged,
                                ctx.mask_in)
            dK[:, :, :pt] += g[1]
            dV[:, :, :pt] += g[2]
            _exchange(ctx.group, p, [g[0]], [])
        elif n_out:
            _exchange(ctx.group, p, [do[:, :, :n_out], out[:, :, :n_out], lse[:, :, :n_out]], [])
            dq_far = q.new_empty(q.shape[:2] + (n_out, q.shape[3]))
            _exchange(ctx.group, p, [], [dq_far])
            dq[:, :, :n_out] += dq_far
        return dq, dK, dV, None, None


def balanced_document_attention(q: Tensor, K: Tensor, V: Tensor, rows_cu: list[Tensor],
                                group) -> Tensor:
    """Document-causal attention of this CP rank's queries ``q [B, H, T, d]`` over the gathered
    ``K, V [B, H, P T, d]``, the work balanced over the ranks as in the unmasked form;
    ``rows_cu``: each row's GLOBAL document offsets. Returns ``[B, H, T, d]``."""
    return _BalancedDocumentAttention.apply(q, K, V, rows_cu, group)
