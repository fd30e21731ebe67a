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

__all__ = ["balanced_causal_attention", "balance_plan", "BACKENDS", "resolve_backend",
           "attention_forward", "attention_backward", "BlockAttention"]


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


# ---------------------------------------------------------------------------- attention kernels
# One partial (block) of attention: ``q [B, H, Tq, d]`` over ``k, v [B, H, Sk, d]``, unmasked or
# causal (aligned lower-right when ``Sk > Tq``: query ``i`` sees keys ``j <= i + Sk - Tq``), and
# its backward given the output and log-sum-exp of the *merged* attention. Written by hand
# around torch's private ops because torch's SDPA returns no log-sum-exp and takes no merged one.
BACKENDS = ("auto", "cudnn", "flash", "math")

# The math backend scores every (query, key) pair in memory; above this many scores on a GPU it
# would run out of memory at long context, so it refuses instead of trying.
_MASKED_GPU_MAX_SCORES = 1 << 28


def _check_small_mask(q, S: int, why: str | None = None) -> None:
    B, H, T, d = q.shape
    if q.is_cuda and B * H * T * S > _MASKED_GPU_MAX_SCORES:
        why = why or (f"flash attention does not take these inputs (dtype {q.dtype}, head_dim "
                      f"{d}, {T} queries over {S} keys), and the masked fallback")
        raise ValueError(
            f"softmax attention under context parallelism: {why} would hold {B * H * T * S:,} "
            f"scores; run in bf16/fp16 (train.precision=bf16) with head_dim a multiple of 8 up "
            f"to 256, and model.attention_backend=auto, cudnn or flash")


def _torch_refusal(check, q: Tensor, k: Tensor, causal: bool) -> str | None:
    """``None`` if torch's SDPA check ``check`` (``can_use_flash_attention`` or
    ``can_use_cudnn_attention``) takes these inputs, else torch's reasons."""
    import warnings

    from torch.backends.cuda import SDPAParams

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = check(SDPAParams(q, k, k, None, 0.0, causal, False), True)
    return None if ok else ("; ".join(str(w.message) for w in caught) or "refused by torch")


def _refusal(backend: str, q: Tensor, k: Tensor, causal: bool) -> str | None:
    """Why ``backend`` cannot run this block (``None``: it can)."""
    from torch.backends import cuda

    Tq, Sk = q.shape[2], k.shape[2]
    if backend == "math":
        return None
    if not q.is_cuda:
        return f"it runs on CUDA devices only (these inputs are on {q.device.type})"
    if backend == "cudnn":
        if causal and Tq != Sk:
            return (f"torch's cuDNN attention aligns a causal mask top-left, and this block "
                    f"({Tq} queries over {Sk} keys) needs it lower-right")
        return _torch_refusal(cuda.can_use_cudnn_attention, q, k, causal)
    # torch's check refuses is_causal with more keys than queries (its is_causal is upper-left);
    # the flash op itself aligns lower-right, so check the unmasked form, as torch's own
    # causal_lower_right dispatch does
    return _torch_refusal(cuda.can_use_flash_attention, q, k, causal and Tq == Sk)


def resolve_backend(backend: str, blocks, candidates=("cudnn", "flash")) -> str:
    """The attention kernel for one call: ``blocks`` lists every ``(q, k, causal)`` the call will
    run (same device, dtype and head_dim; only the lengths differ).

    ``auto`` picks, from device, dtype and shapes alone (so a layer keeps its kernel from call
    to call), the first of ``candidates`` that takes every block: cuDNN where torch's cuDNN
    attention does, else flash, else math (on the CPU always math: torch has neither GPU kernel
    there; on a GPU math only up to a size it can hold). An explicit ``cudnn`` or ``flash``
    that cannot take a block raises a ``ValueError`` saying why, rather than running something
    else."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend={backend!r} is not an attention backend; use one "
                         f"of {BACKENDS}")
    if backend == "auto":
        for b in candidates:
            if all(_refusal(b, *blk) is None for blk in blocks):
                return b
        backend = "math"
    for q, k, causal in blocks:
        why = _refusal(backend, q, k, causal)
        if why:
            alt = ("use attention_backend=math on the CPU" if not q.is_cuda else
                   "use attention_backend=auto (cuDNN, else flash, else math) or another backend")
            raise ValueError(f"attention_backend={backend!r} cannot run this attention (dtype "
                             f"{q.dtype}, head_dim {q.shape[-1]}, {q.shape[2]} queries over "
                             f"{k.shape[2]} keys, causal={causal}): {why}; {alt}")
        if backend == "math":
            _check_small_mask(q, k.shape[2], "the math backend" if q.is_cuda else None)
    return backend


def _acc(dtype) -> torch.dtype:
    """Accumulation dtype (also the kernels' log-sum-exp dtype): float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _math_scores(q: Tensor, k: Tensor, causal: bool) -> Tensor:
    """Scaled scores ``[B, H, Tq, Sk]`` in the accumulation dtype, masked lower-right."""
    acc = _acc(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        Tq, Sk = s.shape[-2:]
        keep = torch.ones(Tq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Tq)
        s = s.masked_fill(~keep, float("-inf"))
    return s


def attention_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                      backend: str) -> tuple[Tensor, Tensor, tuple]:
    """``(out [B, H, Tq, d], lse [B, H, Tq] float32 (float64 for float64), state for backward)``
    of one block with a backend that :func:`resolve_backend` chose. ``q, k, v`` may be strided
    views (last dim dense): both GPU kernels take strides."""
    if backend == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal,
                                                               False)
        # r: out, lse [B, H, Tq, 1], cum_seq_q, cum_seq_k, max_q, max_k, seed, offset, debug
        return r[0], r[1].squeeze(-1), (r[2], r[3], r[4], r[5], r[6], r[7])
    if backend == "flash":
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
        # r: out, lse [B, H, Tq], cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug
        return r[0], r[1], (r[2], r[3], r[4], r[5], r[6], r[7])
    if _cpu_kernel(q, k, causal):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal)
        return out, lse, ()
    return _math_forward(q, k, v, causal)


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       causal: bool, state: tuple, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of one block given the output ``out`` and log-sum-exp ``lse [B, H, Tq]``
    of the merged attention (exact for attention over a union of key sets, as in ring
    attention) and the block's forward ``state``."""
    if backend == "cudnn":
        cq, ck, mq, mk, seed, offset = state
        # the log-sum-exp is read as a dense [B, H, Tq, 1] array
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, out, lse.contiguous().unsqueeze(-1), seed, offset, None, cq, ck, mq, mk,
            0.0, causal)
    if backend == "flash":
        cq, ck, mq, mk, seed, offset = state
        # the log-sum-exp is indexed as a dense [B, H, Tq] array
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse.contiguous(), cq, ck, mq, mk, 0.0, causal, seed, offset)
    if _cpu_kernel(q, k, causal):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
            lse.contiguous(), 0.0, causal)
    return _math_backward(do, q, k, v, out, lse, causal)


def _cpu_kernel(q: Tensor, k: Tensor, causal: bool) -> bool:
    """The math backend on the CPU runs torch's CPU attention kernel (the one
    ``F.scaled_dot_product_attention`` runs there; selective checkpointing can keep its outputs)
    for full and square causal blocks; the explicit formula below serves lower-right causal
    blocks and GPUs."""
    return not q.is_cuda and (not causal or q.shape[2] == k.shape[2])


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor, tuple]:
    """The explicit softmax of masked scores, in the accumulation dtype."""
    s = _math_scores(q, k, causal)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.to(s.dtype)).to(q.dtype)
    return out, lse, ()


def _math_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax backward with the merged statistics: ``P = exp(S - lse)``,
    ``dS = P (dP - rowsum(dO O))``."""
    s = _math_scores(q, k, causal)
    acc = s.dtype
    p = torch.exp(s - lse.to(acc).unsqueeze(-1))
    do_, q_, k_, v_ = do.to(acc), q.to(acc), k.to(acc), v.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), do_)
    dp = torch.matmul(do_, v_.transpose(-1, -2))
    delta = (do_ * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * q.shape[-1] ** -0.5
    dq, dk = torch.matmul(ds, k_), torch.matmul(ds.transpose(-1, -2), q_)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class BlockAttention(torch.autograd.Function):
    """Attention of one block with the chosen backend, differentiable (the one-rank path and the
    unbalanced CP path): ``BlockAttention.apply(q, k, v, causal, backend)``."""

    @staticmethod
    def forward(ctx, q, k, v, causal, backend):
        out, lse, st = attention_forward(q, k, v, causal, backend)
        ctx.causal, ctx.backend, ctx.st = causal, backend, st
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, ctx.causal, ctx.st, ctx.backend)
        return dq, dk, dv, None, None


def _token_major_zeros(t: Tensor) -> Tensor:
    """Zeros of ``t``'s ``[B, H, T, d]`` shape laid out as ``[B, T, H, d]`` in memory."""
    B, H, T, d = t.shape
    return torch.zeros(B, T, H, d, dtype=t.dtype, device=t.device).transpose(1, 2)


def _merge(parts: list[tuple[Tensor, Tensor]], out: Tensor, lse: Tensor) -> None:
    """Write the merge of partials ``(out, lse)`` of the same rows over disjoint key sets into
    ``out`` and ``lse`` (weights ``exp(lse_i - lse)`` in the accumulation dtype)."""
    if len(parts) == 1:
        out.copy_(parts[0][0])
        lse.copy_(parts[0][1])
        return
    lse.copy_(torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0))
    out.copy_(sum(p[0].to(lse.dtype) * torch.exp(p[1] - lse).unsqueeze(-1) for p in parts))


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
    def forward(ctx, q, K, V, group, overlap, backend):
        P, r = dist.get_world_size(group), dist.get_rank(group)
        B, H, T, d = q.shape
        p = P - 1 - r
        moved = balance_plan(P, T)
        n_out, n_in = moved[r], (moved[p] if p != r else 0)
        parts = {}  # row slice key -> list of (out, lse)
        saved = []  # (rows, keys, causal, state) of every own partial

        def own_blocks():
            for rows, keys, causal in _blocks(r, T, n_out):
                o, lse, st = attention_forward(q[:, :, rows], K[:, :, keys], V[:, :, keys],
                                               causal, backend)
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
            o_in, lse_in, st_in = attention_forward(q_in, K[:, :, : p * T], V[:, :, : p * T],
                                                   False, backend)
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
        # the output in token-major memory ([B, T, H, d] seen as [B, H, T, d]): the caller's
        # layout, so that neither the merge here nor the caller's head merge copies it again
        out = q.new_empty(B, T, H, d).transpose(1, 2)
        lse = torch.empty(B, H, T, dtype=_acc(q.dtype), device=q.device)
        for (a, b), part in parts.items():
            _merge(part, out[:, :, a:b], lse[:, :, a:b])
        ctx.group, ctx.blocks, ctx.n, ctx.overlap = group, saved, (n_out, n_in, p), overlap
        ctx.backend = backend
        ctx.st_in = st_in
        ctx.save_for_backward(q, K, V, out, lse, q_in)
        return out

    @staticmethod
    def backward(ctx, do):
        q, K, V, out, lse, q_in = ctx.saved_tensors
        n_out, n_in, p = ctx.n
        T = q.shape[2]
        if do.stride(-1) != 1:  # both GPU kernels take strides, with a dense last dim
            do = do.contiguous()
        backend = ctx.backend
        # gradients accumulate in the inputs' dtype: a key block gets at most three partials,
        # each already rounded to that dtype by the kernel's backward (float32 buffers would be
        # 4 GB more per tensor at 1M keys); token-major like the inputs, so that the caller's
        # transposes and the all-gather's reduce-scatter take them without a copy
        dq, dK, dV = (_token_major_zeros(t) for t in (q, K, V))

        def own_blocks():
            for rows, keys, causal, st in ctx.blocks:
                g = attention_backward(do[:, :, rows], q[:, :, rows], K[:, :, keys],
                                       V[:, :, keys], out[:, :, rows], lse[:, :, rows], causal,
                                       st, backend)
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
            g = attention_backward(do_in, q_in, K[:, :, :pt], V[:, :, :pt], o_merged,
                                   lse_merged, False, ctx.st_in, backend)
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
        return dq, dK, dV, None, None, None


def balanced_causal_attention(q: Tensor, K: Tensor, V: Tensor, group,
                              overlap: bool = False, backend: str = "auto") -> Tensor:
    """Causal attention of this CP rank's queries ``q [B, H, T, d]`` over the gathered keys and
    values ``K, V [B, H, P T, d]`` (every rank's shard, rank order), the work balanced over the
    ranks (see the module doc). Returns ``[B, H, T, d]``.

    ``overlap=False`` runs each rank's own blocks first and exchanges the moved rows after,
    which serialises a pair: ``lo`` waits for ``hi``'s own blocks before it can score ``hi``'s
    rows, and ``hi`` then waits for those. ``overlap=True`` starts the exchange first: ``hi``
    sends its moved rows and posts the receive of their results before its own blocks, ``lo``
    scores them first and sends them back while it runs its own blocks; forward and backward
    alike. Same results, less waiting (docs/results.md).

    ``backend``: the kernel of every block (:data:`BACKENDS`, :func:`resolve_backend`); every
    block is a full block or a square causal one, so cuDNN can serve all of them. Chosen here,
    before any exchange, from the shapes of this rank's blocks."""
    P, r, T = dist.get_world_size(group), dist.get_rank(group), q.shape[2]
    moved, p = balance_plan(P, T), P - 1 - r
    blocks = [(q[:, :, rows], K[:, :, keys], causal)
              for rows, keys, causal in _blocks(r, T, moved[r])]
    if p != r and moved[p]:  # the partner's moved rows against the partner's full blocks
        blocks.append((q[:, :, : moved[p]], K[:, :, : p * T], False))
    backend = resolve_backend(backend, blocks)
    return _BalancedAttention.apply(q, K, V, group, overlap, backend)
