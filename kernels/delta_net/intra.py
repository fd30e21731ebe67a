"""The delta rule's intra-chunk WY form (forward) and its backward, for the per-channel gate
(no gate and one gate per head take ``wy.py``, whose kernels keep fewer registers live).

Per chunk (``BT`` tokens, ``Gamma = exp(G)`` the decay from the chunk start)::

    L   = diag(b) P,   P[t, j] = sum_c k_tc k_jc exp(G_tc - G_jc)  for j < t   (else 0)
    T_A = (I + L)^{-1}                     (unit lower triangular)
    W   = T_A diag(b) (K * Gamma)          U = T_A diag(b) V

(derivation in ``lsp/ops/common/chunk.py``). ``T_A`` is built from ``BC x BC`` sub-blocks: each
diagonal block by forward substitution, the blocks below it by the block formula
``T_ij = -T_ii sum_{j <= m < i} L_im T_mj`` (as in flash-linear-attention's fused solve). For a
per-channel gate ``P`` comes from ``common.pairwise`` (overflow-safe); otherwise it is one product.

Backward, given ``dW`` and ``dU`` (= ``dR``)::

    dX_w = T_A^T dW,  dX_u = T_A^T dU,  dL = -(dX_w W^T + dX_u U^T) (strictly lower),
    dv = b dX_u,  dk += b Gamma dX_w + (pairwise part of diag(b) dL),
    db = rowsum(dX_u V + dX_w K Gamma + dL P),  dG += dX_w b K Gamma + (pairwise part)
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.utils import chunk_program, chunk_rows


@triton.jit
def _inv_unit_lower(b_L, BC: tl.constexpr):
    """``(I + L)^{-1}`` of a strictly lower-triangular ``[BC, BC]`` block, by forward substitution."""
    o = tl.arange(0, BC)
    b_Ai = -b_L
    for i in range(2, BC):
        b_a = tl.sum(tl.where((o == i)[:, None], -b_L, 0.0), 0)
        b_a = tl.where(o < i, b_a, 0.0)
        b_a = b_a + tl.sum(b_a[:, None] * b_Ai, 0)
        b_Ai = tl.where((o == i)[:, None], b_a, b_Ai)
    return b_Ai + (o[:, None] == o[None, :]).to(tl.float32)


@triton.jit
def _lower_half_inverse(A00, A10, A11, L20, L21, L22, L30, L31, L32, L33, BC: tl.constexpr,
                        IP: tl.constexpr):
    """Rows 2 and 3 of the ``4 x 4`` block inverse of ``I + L`` given its top-left ``2 x 2``
    blocks ``A00, A10, A11``: ``A_ii`` by forward substitution, then
    ``A_ij = -A_ii sum_{j <= m < i} L_im A_mj``."""
    A22 = _inv_unit_lower(L22, BC)
    A33 = _inv_unit_lower(L33, BC)
    A21 = -tl.dot(tl.dot(A22, L21, input_precision=IP), A11, input_precision=IP)
    A32 = -tl.dot(tl.dot(A33, L32, input_precision=IP), A22, input_precision=IP)
    A20 = -tl.dot(A22, tl.dot(L20, A00, input_precision=IP)
                  + tl.dot(L21, A10, input_precision=IP), input_precision=IP)
    A31 = -tl.dot(A33, tl.dot(L31, A11, input_precision=IP)
                  + tl.dot(L32, A21, input_precision=IP), input_precision=IP)
    A30 = -tl.dot(A33, tl.dot(L30, A00, input_precision=IP)
                  + tl.dot(L31, A10, input_precision=IP)
                  + tl.dot(L32, A20, input_precision=IP), input_precision=IP)
    return A20, A21, A22, A30, A31, A32, A33


@triton.jit
def _kk_block(k, row_i, row_j, m_i, m_j, K: tl.constexpr, BKI: tl.constexpr, BC: tl.constexpr,
              IP: tl.constexpr):
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BKI)):
        o_k = kb * BKI + tl.arange(0, BKI)
        m_k = o_k < K
        b_ki = tl.load(k + row_i[:, None] * K + o_k[None, :], mask=m_i[:, None] & m_k[None, :],
                       other=0.0)
        b_kj = tl.load(k + row_j[:, None] * K + o_k[None, :], mask=m_j[:, None] & m_k[None, :],
                       other=0.0)
        acc = tl.dot(b_ki, tl.trans(b_kj), acc, input_precision=IP)
    return acc


@triton.jit
def _l_block(k, Pm, beta_i, g_i, g_j, row_i, row_j, m_i, m_j, col0, diag: tl.constexpr,
             K: tl.constexpr, BT: tl.constexpr, BKI: tl.constexpr, BC: tl.constexpr,
             GATE: tl.constexpr, IP: tl.constexpr):
    """Block ``(i, j)`` of ``L = diag(b) P`` (``col0``: first column of block ``j`` in the chunk)."""
    o = tl.arange(0, BC)
    if GATE == 2:
        b_P = tl.load(Pm + row_i[:, None] * BT + (col0 + o)[None, :], mask=m_i[:, None], other=0.0)
    else:
        b_P = _kk_block(k, row_i, row_j, m_i, m_j, K, BKI, BC, IP)
        m = m_i[:, None] & m_j[None, :]
        if diag:
            m = m & (o[:, None] > o[None, :])
        if GATE == 1:
            b_P = b_P * tl.where(m, tl.exp(g_i[:, None] - g_j[None, :]), 0.0)
        else:
            b_P = tl.where(m, b_P, 0.0)
    return b_P * beta_i[:, None]


@triton.jit
def _x_block(x, beta_s, G, row_s, m_s, o_d, m_d, D: tl.constexpr, K: tl.constexpr,
             GATE: tl.constexpr, IS_K: tl.constexpr, dt: tl.constexpr):
    """Rows of ``diag(b) (K * Gamma)`` (``IS_K``) or ``diag(b) V`` in the input dtype."""
    m = m_s[:, None] & m_d[None, :]
    b_x = tl.load(x + row_s[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_x = b_x * beta_s[:, None]
    if IS_K:
        if GATE == 1:
            b_x = b_x * tl.where(m_s, tl.exp(tl.load(G + row_s, mask=m_s, other=0.0)), 0.0)[:, None]
        if GATE == 2:
            b_gk = tl.load(G + row_s[:, None] * K + o_d[None, :], mask=m, other=0.0)
            b_x = b_x * tl.where(m, tl.exp(b_gk), 0.0)
    return b_x.to(dt)


@triton.jit(do_not_specialize=["T"])
def intra_fwd_kernel(k, v, beta, G, Pm, w, u, TA, cu_seqlens, chunk_indices, T,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     BC: tl.constexpr, NC: tl.constexpr, BKI: tl.constexpr, BVI: tl.constexpr,
                     GATE: tl.constexpr, STORE_TA: tl.constexpr, IP: tl.constexpr,
                     IS_VARLEN: tl.constexpr):
    """Grid ``(NT, B*H)``: ``W``, ``U`` ``[B,T,H,K|V]`` (input dtype) and optionally ``T_A``
    ``[B,T,H,BT]`` (float32; row t holds its chunk's columns). Packed documents
    (``IS_VARLEN``, ``B = 1``): one program per row of ``chunk_indices``."""
    i_t, i_bh, i_h, _, bos, T = chunk_program(T, 0, cu_seqlens, chunk_indices, H, IS_VARLEN)
    dt = k.dtype.element_ty
    o = tl.arange(0, BC)
    t0 = i_t * BT

    o_0 = (t0 + o).to(tl.int64)
    m_0 = o_0 < T
    row_0 = (bos + o_0) * H + i_h
    b_b0 = tl.load(beta + row_0, mask=m_0, other=0.0).to(tl.float32)
    g_0 = tl.zeros([BC], dtype=tl.float32)
    if GATE == 1:
        g_0 = tl.load(G + row_0, mask=m_0, other=0.0)
    L00 = _l_block(k, Pm, b_b0, g_0, g_0, row_0, row_0, m_0, m_0, 0, True, K, BT, BKI, BC, GATE, IP)
    A00 = _inv_unit_lower(L00, BC)
    if NC > 1:
        o_1 = (t0 + BC + o).to(tl.int64)
        m_1 = o_1 < T
        row_1 = (bos + o_1) * H + i_h
        b_b1 = tl.load(beta + row_1, mask=m_1, other=0.0).to(tl.float32)
        g_1 = tl.zeros([BC], dtype=tl.float32)
        if GATE == 1:
            g_1 = tl.load(G + row_1, mask=m_1, other=0.0)
        L10 = _l_block(k, Pm, b_b1, g_1, g_0, row_1, row_0, m_1, m_0, 0, False, K, BT, BKI, BC, GATE, IP)
        L11 = _l_block(k, Pm, b_b1, g_1, g_1, row_1, row_1, m_1, m_1, BC, True, K, BT, BKI, BC, GATE, IP)
        A11 = _inv_unit_lower(L11, BC)
        A10 = -tl.dot(tl.dot(A11, L10, input_precision=IP), A00, input_precision=IP)
    if NC > 2:
        o_2 = (t0 + 2 * BC + o).to(tl.int64)
        m_2 = o_2 < T
        row_2 = (bos + o_2) * H + i_h
        b_b2 = tl.load(beta + row_2, mask=m_2, other=0.0).to(tl.float32)
        o_3 = (t0 + 3 * BC + o).to(tl.int64)
        m_3 = o_3 < T
        row_3 = (bos + o_3) * H + i_h
        b_b3 = tl.load(beta + row_3, mask=m_3, other=0.0).to(tl.float32)
        g_2 = tl.zeros([BC], dtype=tl.float32)
        g_3 = tl.zeros([BC], dtype=tl.float32)
        if GATE == 1:
            g_2 = tl.load(G + row_2, mask=m_2, other=0.0)
            g_3 = tl.load(G + row_3, mask=m_3, other=0.0)
        L20 = _l_block(k, Pm, b_b2, g_2, g_0, row_2, row_0, m_2, m_0, 0, False, K, BT, BKI, BC, GATE, IP)
        L21 = _l_block(k, Pm, b_b2, g_2, g_1, row_2, row_1, m_2, m_1, BC, False, K, BT, BKI, BC, GATE, IP)
        L22 = _l_block(k, Pm, b_b2, g_2, g_2, row_2, row_2, m_2, m_2, 2 * BC, True, K, BT, BKI, BC, GATE, IP)
        L30 = _l_block(k, Pm, b_b3, g_3, g_0, row_3, row_0, m_3, m_0, 0, False, K, BT, BKI, BC, GATE, IP)
        L31 = _l_block(k, Pm, b_b3, g_3, g_1, row_3, row_1, m_3, m_1, BC, False, K, BT, BKI, BC, GATE, IP)
        L32 = _l_block(k, Pm, b_b3, g_3, g_2, row_3, row_2, m_3, m_2, 2 * BC, False, K, BT, BKI, BC, GATE, IP)
        L33 = _l_block(k, Pm, b_b3, g_3, g_3, row_3, row_3, m_3, m_3, 3 * BC, True, K, BT, BKI, BC, GATE, IP)
        A20, A21, A22, A30, A31, A32, A33 = _lower_half_inverse(
            A00, A10, A11, L20, L21, L22, L30, L31, L32, L33, BC, IP)

    # W = T_A diag(b) (K * Gamma) and U = T_A diag(b) V, one row block at a time
    a00 = A00.to(dt)
    if NC > 1:
        a10 = A10.to(dt)
        a11 = A11.to(dt)
    if NC > 2:
        a20 = A20.to(dt)
        a21 = A21.to(dt)
        a22 = A22.to(dt)
        a30 = A30.to(dt)
        a31 = A31.to(dt)
        a32 = A32.to(dt)
        a33 = A33.to(dt)
    for ib in range(tl.cdiv(K, BKI) + tl.cdiv(V, BVI)):
        is_k = ib < tl.cdiv(K, BKI)
        if is_k:
            o_d = ib * BKI + tl.arange(0, BKI)
            m_d = o_d < K
            x0 = _x_block(k, b_b0, G, row_0, m_0, o_d, m_d, K, K, GATE, True, dt)
            y0 = tl.dot(a00, x0, input_precision=IP)
            tl.store(w + row_0[:, None] * K + o_d[None, :], y0.to(w.dtype.element_ty),
                     mask=m_0[:, None] & m_d[None, :])
            if NC > 1:
                x1 = _x_block(k, b_b1, G, row_1, m_1, o_d, m_d, K, K, GATE, True, dt)
                y1 = tl.dot(a10, x0, input_precision=IP)
                y1 = tl.dot(a11, x1, y1, input_precision=IP)
                tl.store(w + row_1[:, None] * K + o_d[None, :], y1.to(w.dtype.element_ty),
                         mask=m_1[:, None] & m_d[None, :])
            if NC > 2:
                x2 = _x_block(k, b_b2, G, row_2, m_2, o_d, m_d, K, K, GATE, True, dt)
                x3 = _x_block(k, b_b3, G, row_3, m_3, o_d, m_d, K, K, GATE, True, dt)
                y2 = tl.dot(a20, x0, input_precision=IP)
                y2 = tl.dot(a21, x1, y2, input_precision=IP)
                y2 = tl.dot(a22, x2, y2, input_precision=IP)
                tl.store(w + row_2[:, None] * K + o_d[None, :], y2.to(w.dtype.element_ty),
                         mask=m_2[:, None] & m_d[None, :])
                y3 = tl.dot(a30, x0, input_precision=IP)
                y3 = tl.dot(a31, x1, y3, input_precision=IP)
                y3 = tl.dot(a32, x2, y3, input_precision=IP)
                y3 = tl.dot(a33, x3, y3, input_precision=IP)
                tl.store(w + row_3[:, None] * K + o_d[None, :], y3.to(w.dtype.element_ty),
                         mask=m_3[:, None] & m_d[None, :])
        else:
            o_e = (ib - tl.cdiv(K, BKI)) * BVI + tl.arange(0, BVI)
            m_e = o_e < V
            xv0 = _x_block(v, b_b0, G, row_0, m_0, o_e, m_e, V, K, GATE, False, dt)
            yv0 = tl.dot(a00, xv0, input_precision=IP)
            tl.store(u + row_0[:, None] * V + o_e[None, :], yv0.to(u.dtype.element_ty),
                     mask=m_0[:, None] & m_e[None, :])
            if NC > 1:
                xv1 = _x_block(v, b_b1, G, row_1, m_1, o_e, m_e, V, K, GATE, False, dt)
                yv1 = tl.dot(a10, xv0, input_precision=IP)
                yv1 = tl.dot(a11, xv1, yv1, input_precision=IP)
                tl.store(u + row_1[:, None] * V + o_e[None, :], yv1.to(u.dtype.element_ty),
                         mask=m_1[:, None] & m_e[None, :])
            if NC > 2:
                xv2 = _x_block(v, b_b2, G, row_2, m_2, o_e, m_e, V, K, GATE, False, dt)
                xv3 = _x_block(v, b_b3, G, row_3, m_3, o_e, m_e, V, K, GATE, False, dt)
                yv2 = tl.dot(a20, xv0, input_precision=IP)
                yv2 = tl.dot(a21, xv1, yv2, input_precision=IP)
                yv2 = tl.dot(a22, xv2, yv2, input_precision=IP)
                tl.store(u + row_2[:, None] * V + o_e[None, :], yv2.to(u.dtype.element_ty),
                         mask=m_2[:, None] & m_e[None, :])
                yv3 = tl.dot(a30, xv0, input_precision=IP)
                yv3 = tl.dot(a31, xv1, yv3, input_precision=IP)
                yv3 = tl.dot(a32, xv2, yv3, input_precision=IP)
                yv3 = tl.dot(a33, xv3, yv3, input_precision=IP)
                tl.store(u + row_3[:, None] * V + o_e[None, :], yv3.to(u.dtype.element_ty),
                         mask=m_3[:, None] & m_e[None, :])

    if STORE_TA:
        zero = tl.zeros([BC, BC], dtype=tl.float32)
        _store_block(TA, row_0, m_0, 0, A00, BT, BC)
        for j in range(1, NC):
            _store_block(TA, row_0, m_0, j * BC, zero, BT, BC)
        if NC > 1:
            _store_block(TA, row_1, m_1, 0, A10, BT, BC)
            _store_block(TA, row_1, m_1, BC, A11, BT, BC)
            for j in range(2, NC):
                _store_block(TA, row_1, m_1, j * BC, zero, BT, BC)
        if NC > 2:
            _store_lower_half(TA, row_2, m_2, row_3, m_3, A20, A21, A22, A30, A31, A32, A33,
                              BT, BC)


@triton.jit
def _store_block(ptr, row, m, col0, blk, BT: tl.constexpr, BC: tl.constexpr):
    o = tl.arange(0, BC)
    tl.store(ptr + row[:, None] * BT + (col0 + o)[None, :], blk.to(ptr.dtype.element_ty),
             mask=m[:, None])


@triton.jit
def _store_lower_half(ptr, row_2, m_2, row_3, m_3, A20, A21, A22, A30, A31, A32, A33,
                      BT: tl.constexpr, BC: tl.constexpr):
    """Block rows 2 and 3 of a ``4 x 4`` lower block-triangular ``[BT, BT]`` matrix."""
    _store_block(ptr, row_2, m_2, 0, A20, BT, BC)
    _store_block(ptr, row_2, m_2, BC, A21, BT, BC)
    _store_block(ptr, row_2, m_2, 2 * BC, A22, BT, BC)
    _store_block(ptr, row_2, m_2, 3 * BC, tl.zeros([BC, BC], dtype=tl.float32), BT, BC)
    _store_block(ptr, row_3, m_3, 0, A30, BT, BC)
    _store_block(ptr, row_3, m_3, BC, A31, BT, BC)
    _store_block(ptr, row_3, m_3, 2 * BC, A32, BT, BC)
    _store_block(ptr, row_3, m_3, 3 * BC, A33, BT, BC)


@triton.jit(do_not_specialize=["T", "NT"])
def wy_bwd_kernel(k, v, beta, G, TA, Pm, w, u, dw, dr, dk_in, dk, dv, dbeta, dG, dGl, dg, dP,
                  cu_seqlens, chunk_indices, T, NT,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, IP: tl.constexpr,
                  IS_VARLEN: tl.constexpr):
    """Grid ``(NT, B*H)``. ``dk_in`` holds the float32 partial ``dk`` of ``grad_kernel``; the sum
    goes to ``dk`` (final, or float32 for a per-channel gate, whose pairwise part ``dP`` is
    added later). Scalar gate: the final ``dg`` is written from ``dG`` / ``dGl``; per-channel
    gate: this kernel's part is added into ``dG``."""
    i_t, i_bh, i_h, i_c, bos, T = chunk_program(T, NT, cu_seqlens, chunk_indices, H, IS_VARLEN)
    o_i, o_t, m_t, row = chunk_rows(i_t, i_h, bos, T, H, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = row[:, None] * K + o_k[None, :]

    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_b = tl.load(beta + row, mask=m_t, other=0.0).to(tl.float32)
    b_TA = tl.load(TA + row[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0)
    b_dw = tl.load(dw + p_tk, mask=m_tk, other=0.0)
    b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    if GATE == 0:
        b_kg = b_k
    elif GATE == 1:
        b_g = tl.load(G + row, mask=m_t, other=0.0)
        b_eg = tl.where(m_t, tl.exp(b_g), 0.0)
        b_kg = b_k * b_eg[:, None]
    else:
        b_g = tl.load(G + p_tk, mask=m_tk, other=0.0)
        b_kg = b_k * tl.where(m_tk, tl.exp(b_g), 0.0)

    b_dxw = tl.dot(tl.trans(b_TA), b_dw, input_precision=IP)
    b_dL = -tl.dot(b_dxw, tl.trans(b_w), input_precision=IP)
    # dL^T as its own products (no transposed dot result as a dot operand: Triton 3.4-3.7.0
    # miscompiles those on Hopper, fla #640 / #826)
    b_dLT = -tl.dot(b_w, tl.dot(tl.trans(b_dw), b_TA, input_precision=IP), input_precision=IP)
    b_dk = b_dxw * b_b[:, None]
    if GATE == 1:
        b_dk = b_dk * b_eg[:, None]
    if GATE == 2:
        b_dk = b_dk * tl.where(m_tk, tl.exp(b_g), 0.0)
    b_xk = b_dxw * b_kg
    b_db = tl.sum(b_xk, axis=1)
    for iv in range(tl.cdiv(V, BV)):
        o_c = iv * BV + tl.arange(0, BV)
        m_tc = m_t[:, None] & (o_c < V)[None, :]
        p_tc = row[:, None] * V + o_c[None, :]
        b_du = tl.load(dr + p_tc, mask=m_tc, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_tc, mask=m_tc, other=0.0).to(tl.float32)
        b_u = tl.load(u + p_tc, mask=m_tc, other=0.0).to(tl.float32)
        b_dxu = tl.dot(tl.trans(b_TA), b_du, input_precision=IP)
        b_dL -= tl.dot(b_dxu, tl.trans(b_u), input_precision=IP)
        b_dLT -= tl.dot(b_u, tl.dot(tl.trans(b_du), b_TA, input_precision=IP), input_precision=IP)
        tl.store(dv + p_tc, (b_dxu * b_b[:, None]).to(dv.dtype.element_ty), mask=m_tc)
        b_db += tl.sum(b_dxu * b_v, axis=1)
    m_L = (o_i[:, None] > o_i[None, :]) & m_t[:, None]
    m_LT = (o_i[None, :] > o_i[:, None]) & m_t[None, :]
    b_dL = tl.where(m_L, b_dL, 0.0)
    b_dLT = tl.where(m_LT, b_dLT, 0.0)
    if GATE == 2:
        b_P = tl.load(Pm + row[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0)
    else:
        b_P = tl.dot(b_k, tl.trans(b_k), input_precision=IP)
        if GATE == 1:
            b_D = tl.where(m_L, tl.exp(b_g[:, None] - b_g[None, :]), 0.0)
            b_DT = tl.where(m_LT, tl.exp(b_g[None, :] - b_g[:, None]), 0.0)
        else:
            b_D = tl.where(m_L, 1.0, 0.0)
            b_DT = tl.where(m_LT, 1.0, 0.0)
        b_P = b_P * b_D
    b_PdL = b_P * b_dL
    b_db += tl.sum(b_PdL, axis=1)
    b_dP = b_dL * b_b[:, None]
    if GATE == 2:
        tl.store(dP + row[:, None] * BT + o_i[None, :], b_dP, mask=m_t[:, None])
    else:
        b_dk += tl.dot(b_dP * b_D, b_k, input_precision=IP)
        b_dk += tl.dot(b_dLT * b_b[None, :] * b_DT, b_k, input_precision=IP)
    b_dk += tl.load(dk_in + p_tk, mask=m_tk, other=0.0)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dbeta + row, b_db.to(dbeta.dtype.element_ty), mask=m_t)

    if GATE == 1:
        b_PdP = b_PdL * b_b[:, None]
        b_dG = (tl.sum(b_xk, axis=1) * b_b + tl.sum(b_PdP, axis=1) - tl.sum(b_PdP, axis=0)
                + tl.load(dG + row, mask=m_t, other=0.0))
        b_dG = tl.where(m_t, b_dG, 0.0)
        b_dg = (tl.sum(b_dG, axis=0) - tl.cumsum(b_dG, axis=0) + b_dG
                + tl.load(dGl + i_c * H + i_h))
        tl.store(dg + row, b_dg.to(dg.dtype.element_ty), mask=m_t)
    if GATE == 2:
        b_dG = b_xk * b_b[:, None] + tl.load(dG + p_tk, mask=m_tk, other=0.0)
        tl.store(dG + p_tk, b_dG, mask=m_tk)


@triton.jit(do_not_specialize=["T", "NT"])
def wy_bwd_blocked_kernel(k, v, beta, G, TA, Pm, w, u, dw, dr, dk_in, dk, dv, dbeta, dG, dGl, dg,
                          dP, cu_seqlens, chunk_indices, T, NT,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                          BKW: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                          IP: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``wy_bwd_kernel`` with the key dimension in blocks of ``BKW`` (used for K > 128: the
    single-tile kernel's float32 ``[BT, K]`` operands need more shared memory than an H100 has).
    Same outputs; ``dX_w`` is recomputed per block in a second pass instead of being kept."""
    i_t, i_bh, i_h, i_c, bos, T = chunk_program(T, NT, cu_seqlens, chunk_indices, H, IS_VARLEN)
    o_i, o_t, m_t, row = chunk_rows(i_t, i_h, bos, T, H, BT)

    b_b = tl.load(beta + row, mask=m_t, other=0.0).to(tl.float32)
    b_TA = tl.load(TA + row[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0)
    b_eg = tl.zeros([BT], dtype=tl.float32)
    if GATE == 1:
        b_g = tl.load(G + row, mask=m_t, other=0.0)
        b_eg = tl.where(m_t, tl.exp(b_g), 0.0)
    b_dL = tl.zeros([BT, BT], dtype=tl.float32)
    b_dLT = tl.zeros([BT, BT], dtype=tl.float32)
    b_P = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    b_dGr = tl.zeros([BT], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BKW)):
        o_k = kb * BKW + tl.arange(0, BKW)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_tk = row[:, None] * K + o_k[None, :]
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_dw = tl.load(dw + p_tk, mask=m_tk, other=0.0)
        b_w = tl.load(w + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        if GATE == 0:
            b_kg = b_k
        elif GATE == 1:
            b_kg = b_k * b_eg[:, None]
        else:
            b_kg = b_k * tl.where(m_tk, tl.exp(tl.load(G + p_tk, mask=m_tk, other=0.0)), 0.0)
        b_dxw = tl.dot(tl.trans(b_TA), b_dw, input_precision=IP)
        b_dL -= tl.dot(b_dxw, tl.trans(b_w), input_precision=IP)
        b_dLT -= tl.dot(b_w, tl.dot(tl.trans(b_dw), b_TA, input_precision=IP), input_precision=IP)
        b_xk = b_dxw * b_kg
        b_db += tl.sum(b_xk, axis=1)
        if GATE == 1:
            b_dGr += tl.sum(b_xk, axis=1) * b_b
        if GATE == 2:
            tl.store(dG + p_tk, tl.load(dG + p_tk, mask=m_tk, other=0.0) + b_xk * b_b[:, None],
                     mask=m_tk)
        else:
            b_P = tl.dot(b_k, tl.trans(b_k), b_P, input_precision=IP)
    for iv in range(tl.cdiv(V, BV)):
        o_c = iv * BV + tl.arange(0, BV)
        m_tc = m_t[:, None] & (o_c < V)[None, :]
        p_tc = row[:, None] * V + o_c[None, :]
        b_du = tl.load(dr + p_tc, mask=m_tc, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_tc, mask=m_tc, other=0.0).to(tl.float32)
        b_u = tl.load(u + p_tc, mask=m_tc, other=0.0).to(tl.float32)
        b_dxu = tl.dot(tl.trans(b_TA), b_du, input_precision=IP)
        b_dL -= tl.dot(b_dxu, tl.trans(b_u), input_precision=IP)
        b_dLT -= tl.dot(b_u, tl.dot(tl.trans(b_du), b_TA, input_precision=IP), input_precision=IP)
        tl.store(dv + p_tc, (b_dxu * b_b[:, None]).to(dv.dtype.element_ty), mask=m_tc)
        b_db += tl.sum(b_dxu * b_v, axis=1)
    m_L = (o_i[:, None] > o_i[None, :]) & m_t[:, None]
    m_LT = (o_i[None, :] > o_i[:, None]) & m_t[None, :]
    b_dL = tl.where(m_L, b_dL, 0.0)
    b_dLT = tl.where(m_LT, b_dLT, 0.0)
    if GATE == 2:
        b_P = tl.load(Pm + row[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0)
        b_D = tl.where(m_L, 1.0, 0.0)
        b_DT = tl.where(m_LT, 1.0, 0.0)
    elif GATE == 1:
        b_D = tl.where(m_L, tl.exp(b_g[:, None] - b_g[None, :]), 0.0)
        b_DT = tl.where(m_LT, tl.exp(b_g[None, :] - b_g[:, None]), 0.0)
        b_P = b_P * b_D
    else:
        b_D = tl.where(m_L, 1.0, 0.0)
        b_DT = tl.where(m_LT, 1.0, 0.0)
        b_P = b_P * b_D
    b_PdL = b_P * b_dL
    b_db += tl.sum(b_PdL, axis=1)
    b_dP = b_dL * b_b[:, None]
    if GATE == 2:
        tl.store(dP + row[:, None] * BT + o_i[None, :], b_dP, mask=m_t[:, None])
    tl.store(dbeta + row, b_db.to(dbeta.dtype.element_ty), mask=m_t)
    if GATE == 1:
        b_PdP = b_PdL * b_b[:, None]
        b_dG = (b_dGr + tl.sum(b_PdP, axis=1) - tl.sum(b_PdP, axis=0)
                + tl.load(dG + row, mask=m_t, other=0.0))
        b_dG = tl.where(m_t, b_dG, 0.0)
        b_dg = (tl.sum(b_dG, axis=0) - tl.cumsum(b_dG, axis=0) + b_dG
                + tl.load(dGl + i_c * H + i_h))
        tl.store(dg + row, b_dg.to(dg.dtype.element_ty), mask=m_t)

    # second pass over the key blocks: dk = b Gamma dX_w + (pairwise part) + dk_in
    b_dPm = b_dP * b_D
    b_dPmT = b_dLT * b_b[None, :] * b_DT
    for kb in range(tl.cdiv(K, BKW)):
        o_k = kb * BKW + tl.arange(0, BKW)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_tk = row[:, None] * K + o_k[None, :]
        b_dw = tl.load(dw + p_tk, mask=m_tk, other=0.0)
        b_dk = tl.dot(tl.trans(b_TA), b_dw, input_precision=IP) * b_b[:, None]
        if GATE == 1:
            b_dk = b_dk * b_eg[:, None]
        if GATE == 2:
            b_dk = b_dk * tl.where(m_tk, tl.exp(tl.load(G + p_tk, mask=m_tk, other=0.0)), 0.0)
        else:
            b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
            b_dk += tl.dot(b_dPm, b_k, input_precision=IP)
            b_dk += tl.dot(b_dPmT, b_k, input_precision=IP)
        b_dk += tl.load(dk_in + p_tk, mask=m_tk, other=0.0)
        tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
