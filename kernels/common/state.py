"""Chunk-state passes (forward and reverse) and the affine scan over sequence segments.

Notation per chunk of ``BT`` tokens (rows past ``T`` are masked to zero), with ``G`` the chunk-local
cumulative log-decay, ``Gl`` its value at the chunk's last token, ``S0`` the state at the chunk
start and ``scale`` the query scale::

    Qg = q * exp(G)                 Kd = k * exp(Gl - G)          gamma = exp(Gl)
    A  = scale * (q k^T masked j <= t, times exp(G_t - G_j))      (the intra-chunk scores)
    R  = U - W S0   (delta rule, WY form: U, W from ``delta_net.intra``)   or   R = V
    O  = scale * Qg S0 + A R
    S_end = gamma * S0 + Kd^T R

The sequence of ``NT`` chunks is cut into ``P`` segments of ``SEG`` chunks (``utils.choose_segments``).
Each segment's state map is affine, ``S_end = A_p S_start + B_p``, so:

1. ``MODE=0`` computes the pairs of all segments in parallel: ``B_p`` from a zero start, and for
   the delta rule ``A_p`` by running ``K`` extra "identity" columns (value columns evolve
   independently, so column ``c`` of ``A_p`` is the state of a column started at ``e_c`` with
   ``U = 0``). For decayed linear attention ``A_p`` is the diagonal ``exp(sum g)``, accumulated
   on the fly. Plain linear attention has ``A_p = I``.
2. ``chunk._scan`` folds the pairs: ``S_start[p+1] = A_p S_start[p] + B_p`` (``K x K`` products,
   batched over batch and heads; a handful of small matmuls).
3. ``MODE=1`` reruns every segment from its true start and writes the outputs (no per-chunk states
   reach memory in the forward); ``MODE=2`` (backward recompute) writes the per-chunk states
   ``h`` and residuals ``R`` instead.

The reverse pass is the same with transposes: ``dS_prev = gamma dS + scale Qg^T dO - W^T dR``,
``dR = A^T dO + Kd dS``, scanned in reverse with ``A_p^T``. Packed documents run the same passes
over a segment table (``utils.Segments``: a document, or a piece of a long one, per row; the
scan along each document is ``chunk._scan_segments``).
All index arithmetic that multiplies T, H and a head dim is int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .utils import chunk_program, chunk_rows, doc_span


@triton.jit
def _scores(b_q, b_k, b_g, m_t, o_i, Aqk, row, scale, BT: tl.constexpr, GATE: tl.constexpr,
            IP: tl.constexpr):
    """Intra-chunk scores ``A`` [BT, BT] (scale included), fp32."""
    if GATE == 2:
        b_A = tl.load(Aqk + row[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0)
    else:
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=IP)
        m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
        if GATE == 1:
            b_A = b_A * tl.where(m_A, tl.exp(b_g[:, None] - b_g[None, :]), 0.0) * scale
        else:
            b_A = tl.where(m_A, b_A, 0.0) * scale
    return b_A


@triton.jit
def _scores_t(b_q, b_k, b_g, m_t, o_i, Aqk, row, scale, BT: tl.constexpr, GATE: tl.constexpr,
              IP: tl.constexpr):
    """``A^T`` [BT, BT] as its own product (not ``tl.trans`` of a dot result: Triton 3.4-3.7.0
    miscompiles such operands on Hopper, fla #640 / #826)."""
    if GATE == 2:
        b_AT = tl.trans(tl.load(Aqk + row[:, None] * BT + o_i[None, :], mask=m_t[:, None],
                                other=0.0))
    else:
        b_AT = tl.dot(b_k, tl.trans(b_q), input_precision=IP)
        m_AT = (o_i[None, :] >= o_i[:, None]) & m_t[None, :]
        if GATE == 1:
            b_AT = b_AT * tl.where(m_AT, tl.exp(b_g[None, :] - b_g[:, None]), 0.0) * scale
        else:
            b_AT = tl.where(m_AT, b_AT, 0.0) * scale
    return b_AT


@triton.jit
def _sequence(cu_seqlens, segments, i_b, T, NT, SEG, i_p, BT: tl.constexpr,
              IS_VARLEN: tl.constexpr):
    """``(document, bos, T, first global chunk, n0, n1)`` of the state pass of sequence ``i_b``
    and segment ``i_p``: its chunks are ``n0 <= n < n1`` (local), its rows ``bos + t`` for
    ``t < T``, its per-chunk buffers at ``first + n``. Dense: batch row ``i_b``, segment ``i_p``
    of ``SEG`` chunks. Packed documents: row ``i_b`` of a segment table ``(document, n0, n1,
    first)`` (``utils.Segments``)."""
    if IS_VARLEN:
        doc = tl.load(segments + i_b * 4).to(tl.int64)
        n0 = tl.load(segments + i_b * 4 + 1)
        n1 = tl.load(segments + i_b * 4 + 2)
        first = tl.load(segments + i_b * 4 + 3).to(tl.int64)
        bos, T = doc_span(cu_seqlens, doc)
    else:
        doc = i_b
        bos = i_b * T
        first = i_b * NT
        n0 = i_p * SEG
        n1 = tl.minimum(n0 + SEG, NT)
    return doc, bos, T, first, n0, n1


@triton.jit(do_not_specialize=["scale", "T", "NT", "SEG", "P"])
def state_fwd_kernel(q, k, u, w, G, Aqk, o, h, r, s0, s_end, a_pair, seg_dec,
                     cu_seqlens, segments, scale, T, NT, SEG, P,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, GATE: tl.constexpr,
                     DELTA: tl.constexpr, MODE: tl.constexpr, HAS_S0: tl.constexpr,
                     STORE_END: tl.constexpr, IP: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Grid ``(NV [+ cdiv(K, BV) identity blocks in MODE 0 of the delta rule], B*H, P)``.

    ``u`` is ``U`` (delta rule) or ``v``; ``s0`` ``[B,H,P,K,V]`` start states (``HAS_S0``);
    ``s_end``: ``B_p`` ``[B,H,P,K,V]`` in MODE 0, the final state ``[B,H,K,V]`` in MODE 1.
    Packed documents (``IS_VARLEN``): the grid's second axis is ``rows*H`` for the rows of a
    segment table (``P = 1``); ``s0``, and in MODE 0 ``s_end``, are per row; MODE 1's final state
    ``[N,H,K,V]`` is written by each document's last segment; ``h`` is indexed by global chunk.
    """
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_p = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    doc, bos, T, first, n0, n1 = _sequence(cu_seqlens, segments, i_b, T, NT, SEG, i_p, BT,
                                           IS_VARLEN)
    dt = k.dtype.element_ty
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_i = tl.arange(0, BT)
    o_c = i_v * BV + tl.arange(0, BV)
    m_c = o_c < V  # false for every column of an identity block (i_v >= NV)
    m_kc = m_k[:, None] & m_c[None, :]

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        S += tl.load(s0 + ((i_bh * P + i_p) * K + o_k[:, None]) * V + o_c[None, :], mask=m_kc,
                     other=0.0).to(tl.float32)
    if MODE == 0:
        if DELTA:
            o_a = (i_v - NV) * BV + tl.arange(0, BV)
            m_a = (o_a >= 0) & (o_a < K)
            S += ((o_k[:, None] == o_a[None, :]) & m_a[None, :]).to(tl.float32)
    dec = tl.zeros([BK], dtype=tl.float32)

    for n in range(n0, n1):
        o_t = (n * BT + o_i).to(tl.int64)
        m_t = o_t < T
        row = (bos + o_t) * H + i_h
        row_l = (bos + tl.minimum(n * BT + BT, T) - 1) * H + i_h
        m_tk = m_t[:, None] & m_k[None, :]
        m_tc = m_t[:, None] & m_c[None, :]
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_g = tl.zeros([BT], dtype=tl.float32)
        if GATE == 1:
            b_g = tl.load(G + row, mask=m_t, other=0.0)
            b_gl = tl.load(G + row_l)
        if GATE == 2:
            b_g2 = tl.load(G + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
            b_gl2 = tl.load(G + row_l * K + o_k, mask=m_k, other=0.0)
        if DELTA:
            b_w = tl.load(w + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
            b_u = tl.load(u + row[:, None] * V + o_c[None, :], mask=m_tc, other=0.0)
            b_r = b_u.to(tl.float32) - tl.dot(b_w, S.to(dt), input_precision=IP)
        else:
            b_r = tl.load(u + row[:, None] * V + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
        if MODE == 2:
            p_h = h + (((first + n) * H + i_h) * K + o_k[:, None]) * V + o_c[None, :]
            tl.store(p_h, S.to(h.dtype.element_ty), mask=m_kc)
            if DELTA:
                tl.store(r + row[:, None] * V + o_c[None, :], b_r.to(r.dtype.element_ty),
                         mask=m_tc)
        if MODE == 1:
            b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
            if GATE == 0:
                b_qg = b_q
            elif GATE == 1:
                b_qg = (b_q * tl.exp(b_g)[:, None]).to(dt)
            else:
                b_qg = (b_q * tl.exp(b_g2)).to(dt)
            b_o = tl.dot(b_qg, S.to(dt), input_precision=IP) * scale
            b_A = _scores(b_q, b_k, b_g, m_t, o_i, Aqk, row, scale, BT, GATE, IP)
            b_o += tl.dot(b_A.to(dt), b_r.to(dt), input_precision=IP)
            tl.store(o + row[:, None] * V + o_c[None, :], b_o.to(o.dtype.element_ty), mask=m_tc)
        if GATE == 0:
            b_kd = b_k
        elif GATE == 1:
            b_kd = (b_k * tl.where(m_t, tl.exp(b_gl - b_g), 0.0)[:, None]).to(dt)
            S = S * tl.exp(b_gl)
            dec += b_gl
        else:
            b_kd = (b_k * tl.where(m_tk, tl.exp(b_gl2[None, :] - b_g2), 0.0)).to(dt)
            S = S * tl.exp(b_gl2)[:, None]
            dec += b_gl2
        S = tl.dot(tl.trans(b_kd), b_r.to(dt), S, input_precision=IP)

    if MODE == 0:
        base = (i_bh * P + i_p) * K
        tl.store(s_end + (base + o_k[:, None]) * V + o_c[None, :], S, mask=m_kc)
        if DELTA:
            tl.store(a_pair + (base + o_k[:, None]) * K + o_a[None, :], S,
                     mask=m_k[:, None] & m_a[None, :])
        else:
            if GATE != 0:
                if i_v == 0:
                    tl.store(seg_dec + base + o_k, dec, mask=m_k)
    if MODE == 1:
        if STORE_END:
            if IS_VARLEN:
                if n1 == tl.cdiv(T, BT):  # the document's last segment
                    tl.store(s_end + ((doc * H + i_h) * K + o_k[:, None]) * V + o_c[None, :], S,
                             mask=m_kc)
            elif i_p == P - 1:
                tl.store(s_end + (i_bh * K + o_k[:, None]) * V + o_c[None, :], S, mask=m_kc)


@triton.jit(do_not_specialize=["scale", "T", "NT", "SEG", "P"])
def state_bwd_kernel(q, k, w, G, Aqk, do, dh, dr, ds0, ds_start, cu_seqlens, segments,
                     scale, T, NT, SEG, P,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                     DELTA: tl.constexpr, MODE: tl.constexpr, HAS_DS0: tl.constexpr,
                     IP: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Reverse pass, grid ``(cdiv(V, BV), B*H, P)``.

    ``dr`` holds ``A^T dO`` on entry (:func:`local_dr_kernel`, the part of ``dR`` from each
    chunk's own outputs, computed in parallel), so the loop adds only ``Kd dS``.

    ``ds0`` ``[B,H,P,K,V]``: gradient w.r.t. each segment's end state (``HAS_DS0``); the result,
    the gradient w.r.t. each segment's start state, goes to ``ds_start`` ``[B,H,P,K,V]``.
    MODE 1 also writes ``dh`` (gradient w.r.t. each chunk's end state, ``[B,NT,H,K,V]``) and
    ``dr`` (gradient w.r.t. ``R``, ``[B,T,H,V]``; for linear attention this is ``dv``).
    Packed documents (``IS_VARLEN``) as in ``state_fwd_kernel``: grid ``(.., rows*H, 1)``,
    ``ds0`` and ``ds_start`` per row of the segment table.
    """
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_p = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    doc, bos, T, first, n0, n1 = _sequence(cu_seqlens, segments, i_b, T, NT, SEG, i_p, BT,
                                           IS_VARLEN)
    dt = k.dtype.element_ty
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_i = tl.arange(0, BT)
    o_c = i_v * BV + tl.arange(0, BV)
    m_c = o_c < V
    m_kc = m_k[:, None] & m_c[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DS0:
        dS += tl.load(ds0 + ((i_bh * P + i_p) * K + o_k[:, None]) * V + o_c[None, :], mask=m_kc,
                      other=0.0).to(tl.float32)

    for i in range(n1 - n0):
        n = n1 - 1 - i
        o_t = (n * BT + o_i).to(tl.int64)
        m_t = o_t < T
        row = (bos + o_t) * H + i_h
        row_l = (bos + tl.minimum(n * BT + BT, T) - 1) * H + i_h
        m_tk = m_t[:, None] & m_k[None, :]
        m_tc = m_t[:, None] & m_c[None, :]
        if MODE == 1:
            p_dh = dh + (((first + n) * H + i_h) * K + o_k[:, None]) * V + o_c[None, :]
            tl.store(p_dh, dS.to(dh.dtype.element_ty), mask=m_kc)
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_do = tl.load(do + row[:, None] * V + o_c[None, :], mask=m_tc, other=0.0)
        b_g = tl.zeros([BT], dtype=tl.float32)
        if GATE == 1:
            b_g = tl.load(G + row, mask=m_t, other=0.0)
            b_gl = tl.load(G + row_l)
        if GATE == 2:
            b_g2 = tl.load(G + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
            b_gl2 = tl.load(G + row_l * K + o_k, mask=m_k, other=0.0)
        b_dr = tl.load(dr + row[:, None] * V + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
        if GATE == 0:
            b_kd = b_k
            b_qg = b_q
        elif GATE == 1:
            b_kd = (b_k * tl.where(m_t, tl.exp(b_gl - b_g), 0.0)[:, None]).to(dt)
            b_qg = (b_q * tl.exp(b_g)[:, None]).to(dt)
        else:
            b_kd = (b_k * tl.where(m_tk, tl.exp(b_gl2[None, :] - b_g2), 0.0)).to(dt)
            b_qg = (b_q * tl.exp(b_g2)).to(dt)
        b_dr = tl.dot(b_kd, dS.to(dt), b_dr, input_precision=IP)
        if MODE == 1:
            tl.store(dr + row[:, None] * V + o_c[None, :], b_dr.to(dr.dtype.element_ty), mask=m_tc)
        if GATE == 1:
            dS = dS * tl.exp(b_gl)
        if GATE == 2:
            dS = dS * tl.exp(b_gl2)[:, None]
        dS += tl.dot(tl.trans(b_qg), b_do, input_precision=IP) * scale
        if DELTA:
            b_w = tl.load(w + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
            dS -= tl.dot(tl.trans(b_w), b_dr.to(dt), input_precision=IP)

    tl.store(ds_start + ((i_bh * P + i_p) * K + o_k[:, None]) * V + o_c[None, :], dS, mask=m_kc)


@triton.jit(do_not_specialize=["scale", "T"])
def local_dr_kernel(q, k, G, Aqk, do, dr, cu_seqlens, chunk_indices, scale, T,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, IP: tl.constexpr,
                    IS_VARLEN: tl.constexpr):
    """``dr = A^T dO`` per chunk (the intra-chunk part of ``dR``), grid ``(NT, B*H)``; the
    reverse state pass adds ``Kd dS`` to it in place. One program holds ``A^T`` and runs over
    the value columns in blocks of ``BV``."""
    i_t, i_bh, i_h, _, bos, T = chunk_program(T, 0, cu_seqlens, chunk_indices, H, IS_VARLEN)
    dt = k.dtype.element_ty
    o_i, o_t, m_t, row = chunk_rows(i_t, i_h, bos, T, H, BT)
    o_k = tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    b_q = tl.zeros([BT, BK], dtype=dt)
    b_k = tl.zeros([BT, BK], dtype=dt)
    b_g = tl.zeros([BT], dtype=tl.float32)
    if GATE != 2:
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    if GATE == 1:
        b_g = tl.load(G + row, mask=m_t, other=0.0)
    b_AT = _scores_t(b_q, b_k, b_g, m_t, o_i, Aqk, row, scale, BT, GATE, IP).to(dt)
    for iv in range(tl.cdiv(V, BV)):
        o_c = iv * BV + tl.arange(0, BV)
        m_tc = m_t[:, None] & (o_c < V)[None, :]
        b_do = tl.load(do + row[:, None] * V + o_c[None, :], mask=m_tc, other=0.0)
        b_dr = tl.dot(b_AT, b_do, input_precision=IP)
        tl.store(dr + row[:, None] * V + o_c[None, :], b_dr.to(dr.dtype.element_ty), mask=m_tc)
