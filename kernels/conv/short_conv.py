"""Short causal depthwise convolution in the ``[B, T, C]`` layout, forward and backward in Triton.

``y[t, c] = act(sum_{i<W} w[c, i] * xp[t + i, c])`` over a padded input ``xp [B, T + W - 1, C]``
(the ``W - 1`` rows before the shard: zeros at the sequence start, the previous CP rank's tail
otherwise), ``act`` SiLU or none. torch's ``conv1d`` wants ``[B, C, T]``: the layers hold
``[B, T, C]``, so each call transposes into a contiguous copy and the output comes back strided
(a large share of a long-context step: docs/results.md). Here every tile reads its rows in
place, accumulates in float32, applies the activation in registers and writes ``y`` in the
input's layout. The backward recomputes the pre-activation from ``xp`` (so only ``xp`` is
saved), writes ``dz`` once and per-tile partial sums of the weight gradient, and a second kernel
forms ``dxp`` (whose first ``W - 1`` rows are the gradient of the halo). Packed documents mask
the taps that would reach into an earlier document (``doc_pos``).

Written by hand: no library that lsp depends on has this (fla's and causal-conv1d's kernels are
not dependencies). Fixed block sizes, so it runs under Triton's interpreter too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["short_conv"]

_BT, _BC, _WARPS = 64, 64, 4


@triton.jit
def _tile(T, C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """This program's output rows and channels, their masks, and its batch's offset into ``xp``."""
    i_b = tl.program_id(2).to(tl.int64)
    o_t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = o_c < C
    m = (o_t < T)[:, None] & m_c[None, :]
    return i_b, o_t, o_c, m_c, m, i_b * (T + W - 1) * C


@triton.jit
def _doc_pos(pos, i_b, o_t, T, HAS_POS: tl.constexpr):
    """Each row's position in its document (packed documents; unused otherwise)."""
    if HAS_POS:
        b_pos = tl.load(pos + i_b * T + o_t, mask=o_t < T, other=0)
    else:
        b_pos = o_t.to(tl.int32)
    return b_pos


@triton.jit
def _tap_mask(m, b_pos, back, HAS_POS: tl.constexpr):
    """``m``, less the rows whose tap ``back`` tokens back lies in an earlier document."""
    if HAS_POS:
        mask = m & (b_pos >= back)[:, None]
    else:
        mask = m
    return mask


@triton.jit
def _preact(xp, w, xbase, o_t, o_c, m_c, m, b_pos, C: tl.constexpr, W: tl.constexpr,
            BT: tl.constexpr, BC: tl.constexpr, HAS_POS: tl.constexpr):
    """``z = sum_i w[:, i] * xp[rows + i]`` for the tile, float32; tap ``i`` reads the token
    ``W - 1 - i`` back, kept only inside the row's document (``b_pos``)."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(W):
        b_w = tl.load(w + o_c * W + i, mask=m_c, other=0.0).to(tl.float32)
        mi = _tap_mask(m, b_pos, W - 1 - i, HAS_POS)
        b_x = tl.load(xp + xbase + (o_t + i)[:, None] * C + o_c[None, :], mask=mi, other=0.0)
        acc += b_x.to(tl.float32) * b_w[None, :]
    return acc


@triton.jit(do_not_specialize=["T"])
def conv_fwd_kernel(xp, w, y, pos, T, C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                    BC: tl.constexpr, SILU: tl.constexpr, HAS_POS: tl.constexpr):
    """Grid ``(cdiv(T, BT), cdiv(C, BC), B)``."""
    i_b, o_t, o_c, m_c, m, xbase = _tile(T, C, W, BT, BC)
    b_pos = _doc_pos(pos, i_b, o_t, T, HAS_POS)
    acc = _preact(xp, w, xbase, o_t, o_c, m_c, m, b_pos, C, W, BT, BC, HAS_POS)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + i_b * T * C + o_t[:, None] * C + o_c[None, :], acc.to(y.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["T"])
def conv_bwd_dz_kernel(xp, w, dy, dz, dwp, pos, T, C: tl.constexpr, W: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr,
                       HAS_POS: tl.constexpr):
    """Grid ``(NT, cdiv(C, BC), B)``: ``dz = dy * act'(z)`` (z recomputed) and the tile's partial
    weight gradient ``dwp[b * NT + t, c, i] = sum_rows dz * xp[row + i]`` (float32)."""
    i_b, o_t, o_c, m_c, m, xbase = _tile(T, C, W, BT, BC)
    i_t = tl.program_id(0)
    NT = tl.num_programs(0)
    b_pos = _doc_pos(pos, i_b, o_t, T, HAS_POS)
    b_dy = tl.load(dy + i_b * T * C + o_t[:, None] * C + o_c[None, :], mask=m,
                   other=0.0).to(tl.float32)
    if SILU:
        z = _preact(xp, w, xbase, o_t, o_c, m_c, m, b_pos, C, W, BT, BC, HAS_POS)
        s = tl.sigmoid(z)
        b_dz = b_dy * s * (1.0 + z * (1.0 - s))
    else:
        b_dz = b_dy
    tl.store(dz + i_b * T * C + o_t[:, None] * C + o_c[None, :], b_dz.to(dz.dtype.element_ty),
             mask=m)
    pbase = ((i_b * NT + i_t) * C + o_c) * W
    for i in tl.static_range(W):
        mi = _tap_mask(m, b_pos, W - 1 - i, HAS_POS)
        b_x = tl.load(xp + xbase + (o_t + i)[:, None] * C + o_c[None, :], mask=mi, other=0.0)
        tl.store(dwp + pbase + i, tl.sum(b_dz * b_x.to(tl.float32), axis=0), mask=m_c)


@triton.jit(do_not_specialize=["T"])
def conv_bwd_dx_kernel(dz, w, dxp, pos, T, C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                       BC: tl.constexpr, HAS_POS: tl.constexpr):
    """Grid ``(cdiv(T + W - 1, BT), cdiv(C, BC), B)``: ``dxp[p] = sum_i w[i] dz[p - i]`` over
    ``0 <= p - i < T`` (and, packed, the taps the forward kept)."""
    i_p = tl.program_id(0)
    i_c = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_p = (i_p * BT + tl.arange(0, BT)).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(W):
        b_w = tl.load(w + o_c * W + i, mask=m_c, other=0.0).to(tl.float32)
        t = o_p - i
        m = ((t >= 0) & (t < T))[:, None] & m_c[None, :]
        if HAS_POS:
            t_pos = tl.load(pos + i_b * T + t, mask=(t >= 0) & (t < T), other=0)
            m = m & (t_pos >= W - 1 - i)[:, None]
        b_dz = tl.load(dz + i_b * T * C + t[:, None] * C + o_c[None, :], mask=m, other=0.0)
        acc += b_dz.to(tl.float32) * b_w[None, :]
    m_out = (o_p < T + W - 1)[:, None] & m_c[None, :]
    tl.store(dxp + i_b * (T + W - 1) * C + o_p[:, None] * C + o_c[None, :],
             acc.to(dxp.dtype.element_ty), mask=m_out)


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, weight, silu, pos):
        B, Tp, C = xp.shape
        W = weight.shape[1]
        T = Tp - W + 1
        xp, w = xp.contiguous(), weight.contiguous()
        y = torch.empty(B, T, C, dtype=xp.dtype, device=xp.device)
        grid = (triton.cdiv(T, _BT), triton.cdiv(C, _BC), B)
        conv_fwd_kernel[grid](xp, w, y, pos if pos is not None else w, T, C=C, W=W, BT=_BT,
                              BC=_BC, SILU=silu, HAS_POS=pos is not None, num_warps=_WARPS)
        ctx.save_for_backward(xp, w, pos)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        xp, w, pos = ctx.saved_tensors
        has_pos = pos is not None
        pos = pos if has_pos else w
        B, Tp, C = xp.shape
        W = w.shape[1]
        T = Tp - W + 1
        dy = dy.contiguous()
        NT = triton.cdiv(T, _BT)
        dz = torch.empty(B, T, C, dtype=xp.dtype, device=xp.device)
        dwp = torch.empty(B * NT, C, W, dtype=torch.float32, device=xp.device)
        conv_bwd_dz_kernel[(NT, triton.cdiv(C, _BC), B)](
            xp, w, dy, dz, dwp, pos, T, C=C, W=W, BT=_BT, BC=_BC, SILU=ctx.silu,
            HAS_POS=has_pos, num_warps=_WARPS)
        dxp = torch.empty_like(xp)
        conv_bwd_dx_kernel[(triton.cdiv(Tp, _BT), triton.cdiv(C, _BC), B)](
            dz, w, dxp, pos, T, C=C, W=W, BT=_BT, BC=_BC, HAS_POS=has_pos, num_warps=_WARPS)
        return dxp, dwp.sum(0).to(w.dtype), None, None


def short_conv(xp: torch.Tensor, weight: torch.Tensor, silu: bool,
               doc_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution of ``xp [B, T + W - 1, C]`` (halo rows first) with
    ``weight [C, W]``; returns ``[B, T, C]`` in ``xp``'s dtype (float32 accumulation, the weight
    used in its own dtype). Gradients for ``xp`` and ``weight``.

    Packed documents: ``doc_pos [B, T]`` (int32) is each output row's position in its document;
    a tap that would read ``j`` tokens back reads zero where ``doc_pos < j``, so nothing crosses
    a document boundary, inside the shard or through the halo."""
    if xp.dim() != 3 or weight.dim() != 2 or weight.shape[0] != xp.shape[2]:
        raise ValueError(f"short_conv: xp {tuple(xp.shape)} must be [B, T + W - 1, C] and weight "
                         f"{tuple(weight.shape)} [C, W] with the same C")
    if xp.shape[1] < weight.shape[1]:
        raise ValueError(f"short_conv: {xp.shape[1]} padded rows is fewer than the width "
                         f"{weight.shape[1]}; pass W - 1 halo rows before the shard")
    T = xp.shape[1] - weight.shape[1] + 1
    if doc_pos is not None:
        if tuple(doc_pos.shape) != (xp.shape[0], T):
            raise ValueError(f"short_conv: doc_pos {tuple(doc_pos.shape)} must be [B, T] = "
                             f"[{xp.shape[0]}, {T}], one position per output row")
        doc_pos = doc_pos.to(device=xp.device, dtype=torch.int32).contiguous()
    return _ShortConv.apply(xp, weight, silu, doc_pos)
