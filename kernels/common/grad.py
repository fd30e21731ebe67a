"""Per-chunk gradients from the chunk states ``h`` and their gradients ``dh`` (both families).

For one chunk (notation of ``state.py``), with ``S0 = h`` the state at the chunk start, ``dS = dh``
the gradient w.r.t. the state at its end, ``R`` the residuals (``v`` for linear attention) and
``dR`` their gradient::

    dQg = dO S0^T        (gradient w.r.t. scale * Qg)        dKd = R dS^T
    dA  = dO R^T, masked j <= t                               dW  = -dR S0^T   (delta rule)
    d(chunk decay) = sum_v S0 * dS  (per key channel)

and the chain rule through ``Qg = scale q exp(G)``, ``Kd = k exp(Gl - G)``, ``A`` (pairwise in q and
k) and ``gamma = exp(Gl)`` gives ``dq``, ``dk`` and the gradient w.r.t. the cumulative gates. For a
per-channel gate the pairwise part of ``dA`` is left to ``pairwise.py`` (``dA`` is written out).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .utils import chunk_program, chunk_rows


@triton.jit(do_not_specialize=["scale", "T", "NT", "s_dG", "s_dGl"])
def grad_kernel(q, k, rv, G, h, dh, do, dr, dq, dk, dw, dG, dGl, dg, dAqk, scratch,
                cu_seqlens, chunk_indices, scale, T, NT, s_dG, s_dGl,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
                FINAL_G: tl.constexpr, IP: tl.constexpr, IS_VARLEN: tl.constexpr,
                DAT_MEM: tl.constexpr = False):
    """Grid ``(NT, B*H, NK)``: each program one chunk and one block of ``BK`` key columns
    (``NK = cdiv(K, BK)``). ``dA`` (over the value columns) is computed whole by every block;
    the scalar gate's per-token and per-chunk gradients are sums over the key columns, so each
    block writes its part at ``dG + i_k * s_dG``, ``dGl + i_k * s_dGl`` (``FINAL_G`` needs
    ``NK = 1``).

    Without a per-channel gate the key gradient needs ``dA^T``: by default as a second product
    over the value columns; with ``DAT_MEM`` the masked ``dA`` goes through ``scratch``
    (``[B*T*H, BT]``, ``q``'s dtype) and is read back transposed, as the WY backward does (every
    key block writes the same values there).

    Writes ``dq`` and ``dk`` (in their tensors' dtypes: final values, or float32 partial sums that
    later kernels complete), ``dw`` (delta rule, in its tensor's dtype), and for gates either the
    final ``dg`` (``FINAL_G``: scalar gate of linear attention) or per-token ``dG`` and per-chunk
    ``dGl`` (float32), and ``dAqk`` for per-channel gates. Packed documents (``IS_VARLEN``,
    ``B = 1``): one program per row of ``chunk_indices``; ``h``, ``dh`` and ``dGl`` by global chunk.
    """
    i_t, i_bh, i_h, i_c, bos, T = chunk_program(T, NT, cu_seqlens, chunk_indices, H, IS_VARLEN)
    i_k = tl.program_id(2)
    o_i, o_t, m_t, row = chunk_rows(i_t, i_h, bos, T, H, BT)
    row_l = (bos + tl.minimum(i_t * BT + BT, T) - 1) * H + i_h
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    hbase = (i_c * H + i_h) * K

    b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_dqg = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dAT = tl.zeros([BT, BT], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for iv in range(tl.cdiv(V, BV)):
        o_c = iv * BV + tl.arange(0, BV)
        m_c = o_c < V
        m_kc = m_k[:, None] & m_c[None, :]
        m_tc = m_t[:, None] & m_c[None, :]
        b_h = tl.load(h + (hbase + o_k[:, None]) * V + o_c[None, :], mask=m_kc, other=0.0)
        b_dh = tl.load(dh + (hbase + o_k[:, None]) * V + o_c[None, :], mask=m_kc, other=0.0)
        b_r = tl.load(rv + row[:, None] * V + o_c[None, :], mask=m_tc, other=0.0)
        b_do = tl.load(do + row[:, None] * V + o_c[None, :], mask=m_tc, other=0.0)
        b_dqg = tl.dot(b_do, tl.trans(b_h), b_dqg, input_precision=IP)
        b_dkd = tl.dot(b_r, tl.trans(b_dh), b_dkd, input_precision=IP)
        b_dA = tl.dot(b_do, tl.trans(b_r), b_dA, input_precision=IP)
        if GATE != 2 and not DAT_MEM:
            # dA^T as its own product: on Hopper, Triton 3.4-3.7.0 miscompiles a dot whose
            # operand is the transpose of another dot's result (fla #640 / #826)
            b_dAT = tl.dot(b_r, tl.trans(b_do), b_dAT, input_precision=IP)
        if GATE != 0:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
        if DELTA:
            b_dr = tl.load(dr + row[:, None] * V + o_c[None, :], mask=m_tc, other=0.0)
            b_dw = tl.dot(b_dr, tl.trans(b_h), b_dw, input_precision=IP)
    b_dqg = b_dqg * scale
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    m_AT = (o_i[None, :] >= o_i[:, None]) & m_t[None, :]
    b_dA = tl.where(m_A, b_dA, 0.0)
    b_qf = b_q.to(tl.float32)
    b_kf = b_k.to(tl.float32)

    if GATE == 2:
        b_g = tl.load(G + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_gl = tl.load(G + row_l * K + o_k, mask=m_k, other=0.0)
        b_eg = tl.where(m_tk, tl.exp(b_g), 0.0)
        b_ed = tl.where(m_tk, tl.exp(b_gl[None, :] - b_g), 0.0)
        b_dq = b_dqg * b_eg
        b_dk = b_dkd * b_ed
        b_kdd = b_dkd * b_kf * b_ed
        b_dG = b_dqg * b_qf * b_eg - b_kdd
        b_dgl = tl.sum(b_kdd, axis=0) + tl.exp(b_gl) * b_hdh
        tl.store(dG + row[:, None] * K + o_k[None, :], b_dG, mask=m_tk)
        tl.store(dGl + (i_c * H + i_h) * K + o_k, b_dgl, mask=m_k)
        if i_k == 0:  # every key block has the whole dA
            tl.store(dAqk + row[:, None] * BT + o_i[None, :], b_dA, mask=m_t[:, None])
    else:
        if GATE == 1:
            b_g = tl.load(G + row, mask=m_t, other=0.0)
            b_gl = tl.load(G + row_l)
            b_D = tl.where(m_A, tl.exp(b_g[:, None] - b_g[None, :]), 0.0)
            b_DT = tl.where(m_AT, tl.exp(b_g[None, :] - b_g[:, None]), 0.0)
            b_eg = tl.where(m_t, tl.exp(b_g), 0.0)
            b_ed = tl.where(m_t, tl.exp(b_gl - b_g), 0.0)
            b_dq = b_dqg * b_eg[:, None]
            b_dk = b_dkd * b_ed[:, None]
        else:
            b_D = tl.where(m_A, 1.0, 0.0)
            b_DT = tl.where(m_AT, 1.0, 0.0)
            b_dq = b_dqg
            b_dk = b_dkd
        b_dAm = b_dA * b_D
        b_dq += tl.dot(b_dAm, b_kf, input_precision=IP) * scale
        if DAT_MEM:
            tl.store(scratch + row[:, None] * BT + o_i[None, :],
                     b_dAm.to(scratch.dtype.element_ty), mask=m_t[:, None])
            tl.debug_barrier()
            b_dAmT = tl.load(scratch + row[None, :] * BT + o_i[:, None], mask=m_t[None, :],
                             other=0.0)
            b_dk += tl.dot(b_dAmT, b_q, input_precision=IP) * scale
        else:
            b_dk += tl.dot(b_dAT * b_DT, b_qf, input_precision=IP) * scale
        if GATE == 1:
            b_kdd = tl.sum(b_dkd * b_kf, axis=1) * b_ed
            b_A = tl.dot(b_q, tl.trans(b_k), input_precision=IP) * scale * b_D
            b_AdA = b_A * b_dA
            b_dG = (tl.sum(b_dqg * b_qf, axis=1) * b_eg - b_kdd
                    + tl.sum(b_AdA, axis=1) - tl.sum(b_AdA, axis=0))
            b_dgl = tl.sum(b_kdd, axis=0) + tl.exp(b_gl) * tl.sum(b_hdh, axis=0)
            if FINAL_G:
                b_dG = tl.where(m_t, b_dG, 0.0)
                b_dg = tl.sum(b_dG, axis=0) - tl.cumsum(b_dG, axis=0) + b_dG + b_dgl
                tl.store(dg + row, b_dg.to(dg.dtype.element_ty), mask=m_t)
            else:  # this key block's part
                tl.store(dG + i_k.to(tl.int64) * s_dG + row, b_dG, mask=m_t)
                tl.store(dGl + i_k.to(tl.int64) * s_dGl + i_c * H + i_h, b_dgl)
    tl.store(dq + row[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + row[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if DELTA:
        tl.store(dw + row[:, None] * K + o_k[None, :], (-b_dw).to(dw.dtype.element_ty),
                 mask=m_tk)
