"""The delta rule's WY form for a scalar gate (none / per head), as three kernels of few registers.

Per chunk (``BT`` tokens, ``G`` the chunk-local gate cumsum, ``Gamma = exp(G)``)::

    L  = diag(b) (K K^T * D),  D[t, j] = exp(G_t - G_j) for j < t (else 0)
    Ai = (I + L)^{-1}                                   (unit lower triangular)
    W  = Ai X_w,  X_w = diag(b Gamma) K                 U = Ai X_u,  X_u = diag(b) V

Stages (the names the autograd function calls):

1. ``kkt_solve_kernel``: the ten ``16 x 16`` blocks of ``L`` from one pass over the key columns,
   forward substitution on the four diagonal blocks, the block formula for the rest; stores
   ``Ai`` ``[B, T, H, BT]`` in the input dtype. The forward keeps it for the backward, so the
   solve runs once per step.
2. ``wu_kernel``: ``W`` and ``U`` as ``[BT, BT] x [BT, BW]`` products with ``Ai`` as one tile
   (tensor-core sized, unlike products of the ``16 x 16`` blocks). Run in the forward, and
   again in the backward instead of storing ``W`` and ``U``.
3. ``wy_bwd_scalar_kernel``: given ``dW`` and ``dU``, only ``[BT, BT]`` accumulators cross the loops
   over key and value blocks::

       dAi  = dW X_w^T + dU X_u^T,   dX = Ai^T dW (resp. dU),   dL = -Ai^T dAi Ai^T

   then ``dv = b dX_u``, ``dk = b Gamma dX_w + (dL b D) K + (dL b D)^T K``,
   ``db = rowsum(dX_w K Gamma + dX_u V + dL P)`` and the gate's per-token part. ``Ai^T`` is read
   transposed from memory and ``(dL b D)^T`` goes through a scratch buffer: no transposed dot
   result feeds a dot (Triton 3.4 to 3.7.0 miscompile those on Hopper).

The per-channel gate keeps ``intra.py`` (its pairwise products need the overflow-safe form).
Packed documents follow the kernels' convention: with ``IS_VARLEN`` a program's chunk is row
``i_t`` of ``chunk_indices`` (document, chunk within it) and rows are offset by the document's
first token ``bos``; chunks never straddle documents.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.utils import chunk_program
from .intra import _inv_unit_lower, _lower_half_inverse, _store_block, _store_lower_half


@triton.jit
def _scale_blk(b_A, b_bi, g_i, g_j, m_i, m_j, diag: tl.constexpr, BC: tl.constexpr,
               GATE: tl.constexpr):
    """``diag(b_i) (A * D)`` for one block; ``D`` masked before the exponential."""
    o = tl.arange(0, BC)
    m = m_i[:, None] & m_j[None, :]
    if diag:
        m = m & (o[:, None] > o[None, :])
    if GATE == 1:
        b_A = b_A * tl.exp(tl.where(m, g_i[:, None] - g_j[None, :], float("-inf")))
    else:
        b_A = tl.where(m, b_A, 0.0)
    return b_A * b_bi[:, None]


@triton.jit(do_not_specialize=["T"])
def kkt_solve_kernel(k, beta, G, Ai, cu_seqlens, chunk_indices, T,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                     NC: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr,
                     IS_VARLEN: tl.constexpr, IP: tl.constexpr):
    """Grid ``(NT, B*H)``: ``Ai = (I + L)^{-1}`` of each chunk into ``[B, T, H, BT]``."""
    i_t, i_bh, i_h, _, bos, T = chunk_program(T, 0, cu_seqlens, chunk_indices, H, IS_VARLEN)
    o = tl.arange(0, BC)
    t0 = i_t * BT
    o_0 = t0 + o
    m_0 = o_0 < T
    row_0 = (bos + o_0) * H + i_h
    o_1 = o_0 + BC
    m_1 = o_1 < T
    row_1 = (bos + o_1) * H + i_h
    o_2 = o_0 + 2 * BC
    m_2 = o_2 < T
    row_2 = (bos + o_2) * H + i_h
    o_3 = o_0 + 3 * BC
    m_3 = o_3 < T
    row_3 = (bos + o_3) * H + i_h

    A00 = tl.zeros([BC, BC], dtype=tl.float32)
    A10 = tl.zeros([BC, BC], dtype=tl.float32)
    A11 = tl.zeros([BC, BC], dtype=tl.float32)
    A20 = tl.zeros([BC, BC], dtype=tl.float32)
    A21 = tl.zeros([BC, BC], dtype=tl.float32)
    A22 = tl.zeros([BC, BC], dtype=tl.float32)
    A30 = tl.zeros([BC, BC], dtype=tl.float32)
    A31 = tl.zeros([BC, BC], dtype=tl.float32)
    A32 = tl.zeros([BC, BC], dtype=tl.float32)
    A33 = tl.zeros([BC, BC], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BK)):
        o_k = kb * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k0 = tl.load(k + row_0[:, None] * K + o_k[None, :], mask=m_0[:, None] & m_k[None, :],
                       other=0.0)
        A00 = tl.dot(b_k0, tl.trans(b_k0), A00, input_precision=IP)
        if NC > 1:
            b_k1 = tl.load(k + row_1[:, None] * K + o_k[None, :],
                           mask=m_1[:, None] & m_k[None, :], other=0.0)
            A10 = tl.dot(b_k1, tl.trans(b_k0), A10, input_precision=IP)
            A11 = tl.dot(b_k1, tl.trans(b_k1), A11, input_precision=IP)
        if NC > 2:
            b_k2 = tl.load(k + row_2[:, None] * K + o_k[None, :],
                           mask=m_2[:, None] & m_k[None, :], other=0.0)
            b_k3 = tl.load(k + row_3[:, None] * K + o_k[None, :],
                           mask=m_3[:, None] & m_k[None, :], other=0.0)
            A20 = tl.dot(b_k2, tl.trans(b_k0), A20, input_precision=IP)
            A21 = tl.dot(b_k2, tl.trans(b_k1), A21, input_precision=IP)
            A22 = tl.dot(b_k2, tl.trans(b_k2), A22, input_precision=IP)
            A30 = tl.dot(b_k3, tl.trans(b_k0), A30, input_precision=IP)
            A31 = tl.dot(b_k3, tl.trans(b_k1), A31, input_precision=IP)
            A32 = tl.dot(b_k3, tl.trans(b_k2), A32, input_precision=IP)
            A33 = tl.dot(b_k3, tl.trans(b_k3), A33, input_precision=IP)

    b_b0 = tl.load(beta + row_0, mask=m_0, other=0.0).to(tl.float32)
    g_0 = tl.zeros([BC], dtype=tl.float32)
    if GATE == 1:
        g_0 = tl.load(G + row_0, mask=m_0, other=0.0)
    L00 = _scale_blk(A00, b_b0, g_0, g_0, m_0, m_0, True, BC, GATE)
    Ai00 = _inv_unit_lower(L00, BC)
    _store_block(Ai, row_0, m_0, 0, Ai00, BT, BC)
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(1, NC):
        _store_block(Ai, row_0, m_0, j * BC, zero, BT, BC)
    if NC > 1:
        b_b1 = tl.load(beta + row_1, mask=m_1, other=0.0).to(tl.float32)
        g_1 = tl.zeros([BC], dtype=tl.float32)
        if GATE == 1:
            g_1 = tl.load(G + row_1, mask=m_1, other=0.0)
        L10 = _scale_blk(A10, b_b1, g_1, g_0, m_1, m_0, False, BC, GATE)
        L11 = _scale_blk(A11, b_b1, g_1, g_1, m_1, m_1, True, BC, GATE)
        Ai11 = _inv_unit_lower(L11, BC)
        Ai10 = -tl.dot(tl.dot(Ai11, L10, input_precision=IP), Ai00, input_precision=IP)
        _store_block(Ai, row_1, m_1, 0, Ai10, BT, BC)
        _store_block(Ai, row_1, m_1, BC, Ai11, BT, BC)
        for j in range(2, NC):
            _store_block(Ai, row_1, m_1, j * BC, zero, BT, BC)
    if NC > 2:
        b_b2 = tl.load(beta + row_2, mask=m_2, other=0.0).to(tl.float32)
        b_b3 = tl.load(beta + row_3, mask=m_3, other=0.0).to(tl.float32)
        g_2 = tl.zeros([BC], dtype=tl.float32)
        g_3 = tl.zeros([BC], dtype=tl.float32)
        if GATE == 1:
            g_2 = tl.load(G + row_2, mask=m_2, other=0.0)
            g_3 = tl.load(G + row_3, mask=m_3, other=0.0)
        L20 = _scale_blk(A20, b_b2, g_2, g_0, m_2, m_0, False, BC, GATE)
        L21 = _scale_blk(A21, b_b2, g_2, g_1, m_2, m_1, False, BC, GATE)
        L22 = _scale_blk(A22, b_b2, g_2, g_2, m_2, m_2, True, BC, GATE)
        L30 = _scale_blk(A30, b_b3, g_3, g_0, m_3, m_0, False, BC, GATE)
        L31 = _scale_blk(A31, b_b3, g_3, g_1, m_3, m_1, False, BC, GATE)
        L32 = _scale_blk(A32, b_b3, g_3, g_2, m_3, m_2, False, BC, GATE)
        L33 = _scale_blk(A33, b_b3, g_3, g_3, m_3, m_3, True, BC, GATE)
        Ai20, Ai21, Ai22, Ai30, Ai31, Ai32, Ai33 = _lower_half_inverse(
            Ai00, Ai10, Ai11, L20, L21, L22, L30, L31, L32, L33, BC, IP)
        _store_lower_half(Ai, row_2, m_2, row_3, m_3, Ai20, Ai21, Ai22, Ai30, Ai31, Ai32, Ai33,
                          BT, BC)


@triton.jit
def _ai_rows(b_Ai, x, y, row, m_t, b_scale, D: tl.constexpr, BW: tl.constexpr, IP: tl.constexpr):
    """``y = Ai diag(scale) x`` for one chunk's rows of ``x [.., D]``, ``BW`` columns at a time."""
    for db in range(tl.cdiv(D, BW)):
        o_d = db * BW + tl.arange(0, BW)
        m = m_t[:, None] & (o_d < D)[None, :]
        p = row[:, None] * D + o_d[None, :]
        b_x = tl.load(x + p, mask=m, other=0.0).to(tl.float32) * b_scale[:, None]
        b_y = tl.dot(b_Ai, b_x.to(b_Ai.dtype), input_precision=IP)
        tl.store(y + p, b_y.to(y.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["T"])
def wu_kernel(k, v, beta, G, Ai, w, u, cu_seqlens, chunk_indices, T,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
              BW: tl.constexpr, GATE: tl.constexpr, IS_VARLEN: tl.constexpr, IP: tl.constexpr):
    """Grid ``(NT, B*H)``: ``W = Ai diag(b Gamma) K`` and ``U = Ai diag(b) V``.

    Key and value loops share one block width ``BW``: with ``K = 64`` and value blocks of 32
    next to key blocks of 64, Triton 3.6 built a kernel that read outside its shared memory on
    Hopper (compute-sanitizer: out-of-range shared address in the value product).
    """
    i_t, i_bh, i_h, _, bos, T = chunk_program(T, 0, cu_seqlens, chunk_indices, H, IS_VARLEN)
    dt = k.dtype.element_ty
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    row = (bos + o_t) * H + i_h
    b_Ai = tl.load(Ai + row[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0).to(dt)
    b_b = tl.load(beta + row, mask=m_t, other=0.0).to(tl.float32)
    b_bk = b_b
    if GATE == 1:
        b_bk = b_b * tl.exp(tl.load(G + row, mask=m_t, other=0.0))
    _ai_rows(b_Ai, k, w, row, m_t, b_bk, K, BW, IP)
    _ai_rows(b_Ai, v, u, row, m_t, b_b, V, BW, IP)


@triton.jit(do_not_specialize=["T", "NT"])
def wy_bwd_scalar_kernel(k, v, beta, G, Ai, dw, du, dk_acc, dk, dv, dbeta, dG, dGl, dg, scratch,
                         cu_seqlens, chunk_indices, T, NT,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         BW: tl.constexpr, GATE: tl.constexpr, IS_VARLEN: tl.constexpr,
                         IP: tl.constexpr, DL_LOW: tl.constexpr = False):
    """Grid ``(NT, B*H)``. ``dk_acc`` (float32) holds the partial ``dk`` of the state gradients;
    the sum goes to ``dk``. ``DL_LOW``: the two products of ``dL`` take operands in the input dtype (as fla's), not
    float32. With a gate, ``dG`` holds the per-token gate gradient of the other
    kernels and ``dGl`` the per-chunk one; the final ``dg`` is written. ``scratch``
    ``[B, T, H, BT]`` (input dtype) takes ``(dL b D)`` so that it is read back transposed.

    Products take operands in the input dtype (``dW`` is rounded to it), float32 accumulators;
    the two products of ``dL = -Ai^T dAi Ai^T`` stay in float32. One block width ``BW`` for the
    key and value loops (see ``wu_kernel``).
    """
    i_t, i_bh, i_h, i_c, bos, T = chunk_program(T, NT, cu_seqlens, chunk_indices, H, IS_VARLEN)
    dt = k.dtype.element_ty
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    row = (bos + o_t) * H + i_h
    b_b = tl.load(beta + row, mask=m_t, other=0.0).to(tl.float32)
    b_eg = tl.where(m_t, 1.0, 0.0)
    if GATE == 1:
        b_g = tl.load(G + row, mask=m_t, other=0.0)
        b_eg = tl.exp(b_g)
    b_bk = b_b * b_eg
    # Ai^T straight from memory: b_AiT[i, j] = Ai[j, i]
    b_AiT = tl.load(Ai + row[None, :] * BT + o_i[:, None], mask=m_t[None, :], other=0.0)
    b_dAi = tl.zeros([BT, BT], dtype=tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    b_dGr = tl.zeros([BT], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BW)):
        o_k = kb * BW + tl.arange(0, BW)
        m_k = m_t[:, None] & (o_k < K)[None, :]
        p_k = row[:, None] * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m_k, other=0.0)
        b_kf = b_k.to(tl.float32)
        b_dw = tl.load(dw + p_k, mask=m_k, other=0.0).to(dt)
        b_xw = (b_kf * b_bk[:, None]).to(dt)
        b_dAi = tl.dot(b_dw, tl.trans(b_xw), b_dAi, input_precision=IP)
        b_kk = tl.dot(b_k, tl.trans(b_k), b_kk, input_precision=IP)
        b_dxw = tl.dot(b_AiT, b_dw, input_precision=IP)
        b_xk = tl.sum(b_dxw * b_kf, axis=1) * b_eg
        b_db += b_xk
        b_dGr += b_xk * b_b
    for vb in range(tl.cdiv(V, BW)):
        o_v = vb * BW + tl.arange(0, BW)
        m_v = m_t[:, None] & (o_v < V)[None, :]
        p_v = row[:, None] * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_v, other=0.0)
        b_du = tl.load(du + p_v, mask=m_v, other=0.0).to(dt)
        b_xu = (b_v.to(tl.float32) * b_b[:, None]).to(dt)
        b_dAi = tl.dot(b_du, tl.trans(b_xu), b_dAi, input_precision=IP)
        b_dxu = tl.dot(b_AiT, b_du, input_precision=IP)
        tl.store(dv + p_v, (b_dxu * b_b[:, None]).to(dv.dtype.element_ty), mask=m_v)
        b_db += tl.sum(b_dxu * b_v.to(tl.float32), axis=1)
    if DL_LOW:
        b_dL = -tl.dot(tl.dot(b_AiT, b_dAi.to(dt), input_precision=IP).to(dt), b_AiT,
                       input_precision=IP)
    else:
        b_AiTf = b_AiT.to(tl.float32)
        b_dL = -tl.dot(tl.dot(b_AiTf, b_dAi, input_precision=IP), b_AiTf, input_precision=IP)
    m_L = (o_i[:, None] > o_i[None, :]) & m_t[:, None] & m_t[None, :]
    if GATE == 1:
        b_D = tl.exp(tl.where(m_L, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_D = tl.where(m_L, 1.0, 0.0)
    b_PdL = b_kk * b_D * b_dL
    b_dPD = (b_dL * b_D * b_b[:, None]).to(dt)
    # (dL b D)^T for the key gradient: through memory, not a transposed product result
    tl.store(scratch + row[:, None] * BT + o_i[None, :], b_dPD, mask=m_t[:, None])
    b_db = b_db + tl.sum(b_PdL, axis=1)
    tl.store(dbeta + row, b_db.to(dbeta.dtype.element_ty), mask=m_t)
    if GATE == 1:
        b_PdP = b_PdL * b_b[:, None]
        b_dG = (b_dGr + tl.sum(b_PdP, axis=1) - tl.sum(b_PdP, axis=0)
                + tl.load(dG + row, mask=m_t, other=0.0))
        b_dG = tl.where(m_t, b_dG, 0.0)
        b_dg = tl.sum(b_dG, axis=0) - tl.cumsum(b_dG, axis=0) + b_dG + tl.load(dGl + i_c * H + i_h)
        tl.store(dg + row, b_dg.to(dg.dtype.element_ty), mask=m_t)
    tl.debug_barrier()
    b_dPDT = tl.load(scratch + row[None, :] * BT + o_i[:, None], mask=m_t[None, :], other=0.0)
    for kb2 in range(tl.cdiv(K, BW)):
        o_k2 = kb2 * BW + tl.arange(0, BW)
        m_k2 = m_t[:, None] & (o_k2 < K)[None, :]
        p_k2 = row[:, None] * K + o_k2[None, :]
        b_k2 = tl.load(k + p_k2, mask=m_k2, other=0.0)
        b_dw2 = tl.load(dw + p_k2, mask=m_k2, other=0.0).to(dt)
        b_dk = tl.dot(b_AiT, b_dw2, input_precision=IP) * b_bk[:, None]
        b_dk += tl.load(dk_acc + p_k2, mask=m_k2, other=0.0)
        b_dk = tl.dot(b_dPD, b_k2, b_dk, input_precision=IP)
        b_dk = tl.dot(b_dPDT, b_k2, b_dk, input_precision=IP)
        tl.store(dk + p_k2, b_dk.to(dk.dtype.element_ty), mask=m_k2)
