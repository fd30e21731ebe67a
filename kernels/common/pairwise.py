"""Intra-chunk pairwise products under a per-key-channel gate, computed without overflow.

``M[t, j] = xscale * sum_c x[t, c] y[j, c] exp(G[t, c] - G[j, c])`` for ``j <= t`` (``j < t`` if
strict) inside each chunk, ``[B, T, H, BT]`` float32 (row ``t`` holds its chunk's columns).

The factor ``exp(G_t - G_j)`` cannot be split as ``exp(G_t) exp(-G_j)`` over a whole chunk (with
strong decay the second factor overflows), so the chunk is cut into sub-chunks of ``BC`` rows. For
a block of rows ``i`` and columns ``j < i`` the split is taken at the boundary ``r`` between them
(``G_t - G_r <= 0`` and ``G_r - G_j <= 0``: both factors at most 1) and the block is one matrix
product; the diagonal blocks are summed elementwise, one column (or row) at a time. The same
holds in the backward, which returns ``dx``, ``dy`` and the gate gradient ``x dx - y dy``
(accumulated into float32 buffers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import SUB_CHUNK, chunk_program, dot_precision, launch, next_pow2, varlen_pointers


@triton.jit(do_not_specialize=["xscale", "xscale2", "T"])
def pairwise_fwd_kernel(x, x2, y, G, out, out2, cu_seqlens, chunk_indices, xscale, xscale2, T,
                        H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                        BKP: tl.constexpr, NC: tl.constexpr, STRICT: tl.constexpr,
                        TWO: tl.constexpr, STRICT2: tl.constexpr, IP: tl.constexpr,
                        IS_VARLEN: tl.constexpr):
    """Grid ``(NT, B*H, NC)``: sub-chunk ``s``'s rows of ``M``; with ``TWO`` also those of a
    second product ``M2`` of ``x2`` with the same ``y`` (scale ``xscale2``, strict if
    ``STRICT2``; ``STRICT`` must then be off), sharing the loads of ``y`` and ``G`` and every
    exponential (KDA-like's ``Aqk`` and ``Akk``, as fla computes them in one kernel)."""
    i_t, i_bh, i_h, _, bos, T = chunk_program(T, 0, cu_seqlens, chunk_indices, H, IS_VARLEN)
    i_s = tl.program_id(2)
    o_c = tl.arange(0, BC)
    t_s = i_t * BT + i_s * BC
    if t_s >= T:  # a sub-chunk of padding only
        return
    o_r = (t_s + o_c).to(tl.int64)
    m_r = o_r < T
    row_r = (bos + o_r) * H + i_h
    row_ref = (bos + t_s - 1) * H + i_h

    for j in range(i_s):
        o_j = (i_t * BT + j * BC + o_c).to(tl.int64)
        m_j = o_j < T
        row_j = (bos + o_j) * H + i_h
        acc = tl.zeros([BC, BC], dtype=tl.float32)
        acc2 = tl.zeros([BC, BC], dtype=tl.float32)
        for kb in range(tl.cdiv(K, BKP)):
            o_k = kb * BKP + tl.arange(0, BKP)
            m_k = o_k < K
            m_rk = m_r[:, None] & m_k[None, :]
            m_jk = m_j[:, None] & m_k[None, :]
            b_x = tl.load(x + row_r[:, None] * K + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
            b_y = tl.load(y + row_j[:, None] * K + o_k[None, :], mask=m_jk, other=0.0).to(tl.float32)
            b_gr = tl.load(G + row_r[:, None] * K + o_k[None, :], mask=m_rk, other=0.0)
            b_gj = tl.load(G + row_j[:, None] * K + o_k[None, :], mask=m_jk, other=0.0)
            # (interpreter: scalar conditions enter masks as tensor comparisons)
            m_ref = m_k & ((o_k * 0 + t_s) >= 1) & ((o_k * 0 + t_s - 1) < T)
            b_gref = tl.load(G + row_ref * K + o_k, mask=m_ref, other=0.0)
            b_er = tl.where(m_rk, tl.exp(b_gr - b_gref[None, :]), 0.0)
            b_ys = b_y * tl.where(m_jk, tl.exp(b_gref[None, :] - b_gj), 0.0)
            acc = tl.dot(b_x * b_er, tl.trans(b_ys), acc, input_precision=IP)
            if TWO:
                b_x2 = tl.load(x2 + row_r[:, None] * K + o_k[None, :], mask=m_rk,
                               other=0.0).to(tl.float32)
                acc2 = tl.dot(b_x2 * b_er, tl.trans(b_ys), acc2, input_precision=IP)
        tl.store(out + row_r[:, None] * BT + (j * BC + o_c)[None, :], acc * xscale,
                 mask=m_r[:, None])
        if TWO:
            tl.store(out2 + row_r[:, None] * BT + (j * BC + o_c)[None, :], acc2 * xscale2,
                     mask=m_r[:, None])

    acc = tl.zeros([BC, BC], dtype=tl.float32)
    acc2 = tl.zeros([BC, BC], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BKP)):
        o_k = kb * BKP + tl.arange(0, BKP)
        m_k = o_k < K
        m_rk = m_r[:, None] & m_k[None, :]
        b_x = tl.load(x + row_r[:, None] * K + o_k[None, :], mask=m_rk, other=0.0).to(tl.float32)
        b_gr = tl.load(G + row_r[:, None] * K + o_k[None, :], mask=m_rk, other=0.0)
        if TWO:
            b_x2 = tl.load(x2 + row_r[:, None] * K + o_k[None, :], mask=m_rk,
                           other=0.0).to(tl.float32)
        for jj in range(BC):
            t_j = t_s + jj
            m_kj = m_k & ((o_k * 0 + t_j) < T)
            row_tj = (bos + t_j) * H + i_h
            b_yj = tl.load(y + row_tj * K + o_k, mask=m_kj, other=0.0).to(tl.float32)
            b_gj = tl.load(G + row_tj * K + o_k, mask=m_kj, other=0.0)
            if STRICT:
                m_d = (o_c > jj) & m_r
            else:
                m_d = (o_c >= jj) & m_r
            b_e = tl.where(m_d[:, None] & m_k[None, :], tl.exp(b_gr - b_gj[None, :]), 0.0)
            col = tl.sum(b_x * b_yj[None, :] * b_e, axis=1)
            acc += tl.where(o_c[None, :] == jj, col[:, None], 0.0)
            if TWO:
                col2 = tl.sum(b_x2 * b_yj[None, :] * b_e, axis=1)
                if STRICT2:  # b_e holds the diagonal (STRICT is off)
                    col2 = tl.where(o_c > jj, col2, 0.0)
                acc2 += tl.where(o_c[None, :] == jj, col2[:, None], 0.0)
    tl.store(out + row_r[:, None] * BT + (i_s * BC + o_c)[None, :], acc * xscale,
             mask=m_r[:, None])
    for j in range(i_s + 1, NC):
        tl.store(out + row_r[:, None] * BT + (j * BC + o_c)[None, :],
                 tl.zeros([BC, BC], dtype=tl.float32), mask=m_r[:, None])
    if TWO:
        tl.store(out2 + row_r[:, None] * BT + (i_s * BC + o_c)[None, :], acc2 * xscale2,
                 mask=m_r[:, None])
        for j in range(i_s + 1, NC):
            tl.store(out2 + row_r[:, None] * BT + (j * BC + o_c)[None, :],
                     tl.zeros([BC, BC], dtype=tl.float32), mask=m_r[:, None])


@triton.jit(do_not_specialize=["xscale", "xscale2", "T"])
def pairwise_bwd_kernel(dM, dM2, x, y, G, dx, dy, dG, cu_seqlens, chunk_indices, xscale,
                        xscale2, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                        BC: tl.constexpr, BKP: tl.constexpr, NC: tl.constexpr,
                        SAME: tl.constexpr, TWO: tl.constexpr, IP: tl.constexpr,
                        IS_VARLEN: tl.constexpr):
    """Grid ``(NT, B*H, NC)``: sub-chunk ``s`` gets ``dx`` from its row blocks of ``dM`` and
    ``dy`` from its column blocks; all three results are added into their float32 buffers.
    With ``TWO`` (``SAME`` off) also the gradient ``dM2`` of the product of ``y`` with itself
    (scale ``xscale2``; read like ``dM``, its diagonal included), added into ``dy`` from both
    sides, sharing the loads of ``y`` and ``G`` and the exponentials."""
    i_t, i_bh, i_h, _, bos, T = chunk_program(T, 0, cu_seqlens, chunk_indices, H, IS_VARLEN)
    i_s = tl.program_id(2)
    o_c = tl.arange(0, BC)
    t_s = i_t * BT + i_s * BC
    if t_s >= T:  # a sub-chunk of padding only
        return
    o_r = (t_s + o_c).to(tl.int64)
    m_r = o_r < T
    row_r = (bos + o_r) * H + i_h
    # split point for the blocks left of the diagonal: the row just before this sub-chunk
    row_ref = (bos + t_s - 1) * H + i_h
    # split point for the blocks below the diagonal: this sub-chunk's last valid row
    row_ref2 = (bos + tl.minimum(t_s + BC, T) - 1) * H + i_h

    for kb in range(tl.cdiv(K, BKP)):
        o_k = kb * BKP + tl.arange(0, BKP)
        m_k = o_k < K
        m_rk = m_r[:, None] & m_k[None, :]
        p_rk = row_r[:, None] * K + o_k[None, :]
        b_x = tl.load(x + p_rk, mask=m_rk, other=0.0).to(tl.float32)
        b_y = tl.load(y + p_rk, mask=m_rk, other=0.0).to(tl.float32)
        b_g = tl.load(G + p_rk, mask=m_rk, other=0.0)
        # (interpreter: scalar conditions enter masks as tensor comparisons)
        m_ref = m_k & ((o_k * 0 + i_s) > 0) & ((o_k * 0 + t_s - 1) < T)
        m_ref2 = m_k & ((o_k * 0 + t_s) < T)

        # dx: blocks (s, j) for j < s, then the diagonal block (dx2: the same with dM2)
        b_gref = tl.load(G + row_ref * K + o_k, mask=m_ref, other=0.0)
        acc = tl.zeros([BC, BKP], dtype=tl.float32)
        if TWO:
            acc2 = tl.zeros([BC, BKP], dtype=tl.float32)
        for j in range(i_s):
            o_j = (i_t * BT + j * BC + o_c).to(tl.int64)
            m_j = o_j < T
            row_j = (bos + o_j) * H + i_h
            m_jk = m_j[:, None] & m_k[None, :]
            b_yj = tl.load(y + row_j[:, None] * K + o_k[None, :], mask=m_jk, other=0.0).to(tl.float32)
            b_gj = tl.load(G + row_j[:, None] * K + o_k[None, :], mask=m_jk, other=0.0)
            b_yj = b_yj * tl.where(m_jk, tl.exp(b_gref[None, :] - b_gj), 0.0)
            b_dm = tl.load(dM + row_r[:, None] * BT + (j * BC + o_c)[None, :], mask=m_r[:, None],
                           other=0.0)
            acc = tl.dot(b_dm, b_yj, acc, input_precision=IP)
            if TWO:
                b_dm = tl.load(dM2 + row_r[:, None] * BT + (j * BC + o_c)[None, :],
                               mask=m_r[:, None], other=0.0)
                acc2 = tl.dot(b_dm, b_yj, acc2, input_precision=IP)
        b_dx = acc * tl.where(m_r[:, None] & m_ref[None, :], tl.exp(b_g - b_gref[None, :]), 0.0)
        if TWO:
            b_dx2 = acc2 * tl.where(m_r[:, None] & m_ref[None, :], tl.exp(b_g - b_gref[None, :]),
                                    0.0)
        for jj in range(BC):
            t_j = t_s + jj
            m_kj = m_k & ((o_k * 0 + t_j) < T)
            row_tj = (bos + t_j) * H + i_h
            b_yj = tl.load(y + row_tj * K + o_k, mask=m_kj, other=0.0).to(tl.float32)
            b_gj = tl.load(G + row_tj * K + o_k, mask=m_kj, other=0.0)
            b_dmc = tl.load(dM + row_r * BT + i_s * BC + jj, mask=m_r, other=0.0)
            m_d = (o_c >= jj) & m_r
            b_e = tl.where(m_d[:, None] & m_k[None, :], tl.exp(b_g - b_gj[None, :]), 0.0)
            b_dx += b_dmc[:, None] * b_yj[None, :] * b_e
            if TWO:
                b_dmc = tl.load(dM2 + row_r * BT + i_s * BC + jj, mask=m_r, other=0.0)
                b_dx2 += b_dmc[:, None] * b_yj[None, :] * b_e

        # dy: blocks (i, s) for i > s, then the diagonal block
        b_gref2 = tl.load(G + row_ref2 * K + o_k, mask=m_ref2, other=0.0)
        acc = tl.zeros([BC, BKP], dtype=tl.float32)
        if TWO:
            acc2 = tl.zeros([BC, BKP], dtype=tl.float32)
        for i in range(i_s + 1, NC):
            o_j = (i_t * BT + i * BC + o_c).to(tl.int64)
            m_j = o_j < T
            row_j = (bos + o_j) * H + i_h
            m_jk = m_j[:, None] & m_k[None, :]
            b_xi = tl.load(x + row_j[:, None] * K + o_k[None, :], mask=m_jk, other=0.0).to(tl.float32)
            b_gi = tl.load(G + row_j[:, None] * K + o_k[None, :], mask=m_jk, other=0.0)
            b_xi = b_xi * tl.where(m_jk, tl.exp(b_gi - b_gref2[None, :]), 0.0)
            b_dm = tl.load(dM + row_j[:, None] * BT + (i_s * BC + o_c)[None, :], mask=m_j[:, None],
                           other=0.0)
            acc = tl.dot(tl.trans(b_dm), b_xi, acc, input_precision=IP)
            if TWO:
                b_yi = tl.load(y + row_j[:, None] * K + o_k[None, :], mask=m_jk,
                               other=0.0).to(tl.float32)
                b_yi = b_yi * tl.where(m_jk, tl.exp(b_gi - b_gref2[None, :]), 0.0)
                b_dm = tl.load(dM2 + row_j[:, None] * BT + (i_s * BC + o_c)[None, :],
                               mask=m_j[:, None], other=0.0)
                acc2 = tl.dot(tl.trans(b_dm), b_yi, acc2, input_precision=IP)
        b_dy = acc * tl.where(m_r[:, None] & m_ref2[None, :], tl.exp(b_gref2[None, :] - b_g), 0.0)
        if TWO:
            b_dy2 = acc2 * tl.where(m_r[:, None] & m_ref2[None, :],
                                    tl.exp(b_gref2[None, :] - b_g), 0.0)
        for tt in range(BC):
            t_r = t_s + tt
            m_kr = m_k & ((o_k * 0 + t_r) < T)
            m_cr = m_r & ((o_c * 0 + t_r) < T)
            row_tr = (bos + t_r) * H + i_h
            b_xt = tl.load(x + row_tr * K + o_k, mask=m_kr, other=0.0).to(tl.float32)
            b_gt = tl.load(G + row_tr * K + o_k, mask=m_kr, other=0.0)
            b_dmr = tl.load(dM + row_tr * BT + i_s * BC + o_c, mask=m_cr, other=0.0)
            m_d = (o_c <= tt) & m_cr
            b_e = tl.where(m_d[:, None] & m_k[None, :], tl.exp(b_gt[None, :] - b_g), 0.0)
            b_dy += b_dmr[:, None] * b_xt[None, :] * b_e
            if TWO:
                b_yt = tl.load(y + row_tr * K + o_k, mask=m_kr, other=0.0).to(tl.float32)
                b_dmr = tl.load(dM2 + row_tr * BT + i_s * BC + o_c, mask=m_cr, other=0.0)
                b_dy2 += b_dmr[:, None] * b_yt[None, :] * b_e

        b_dx = b_dx * xscale
        b_dy = b_dy * xscale
        b_dg = b_x * b_dx - b_y * b_dy
        if TWO:  # the self-product's gradient goes to y from both sides
            b_dx2 = b_dx2 * xscale2
            b_dy2 = b_dy2 * xscale2
            b_dg += b_y * b_dx2 - b_y * b_dy2
            b_dy += b_dx2 + b_dy2
        if SAME:
            b_dx += b_dy
            tl.store(dx + p_rk, tl.load(dx + p_rk, mask=m_rk, other=0.0) + b_dx, mask=m_rk)
        else:
            tl.store(dx + p_rk, tl.load(dx + p_rk, mask=m_rk, other=0.0) + b_dx, mask=m_rk)
            tl.store(dy + p_rk, tl.load(dy + p_rk, mask=m_rk, other=0.0) + b_dy, mask=m_rk)
        tl.store(dG + p_rk, tl.load(dG + p_rk, mask=m_rk, other=0.0) + b_dg, mask=m_rk)


# Warps per launch, all 4 by a same-run A/B on the H200 (``launch/ab_pairwise.py`` at fbc8daa,
# now ``python -m lsp.launch.ab_kernels --experiment pairwise``; docs/results.md 2026-12-01,
# fourth session): the fused pair at 4 warps spills 48 / 784 bytes in its sm_90
# build, yet took 43.0 ms for KDA-like fwd+bwd at 64K against 56.3 at 8 warps (46.9 separate).
PAIR_WARPS = {"fwd": 4, "bwd": 4, "fwd2": 4, "bwd2": 4}


def _sizes(x: torch.Tensor, BT: int, varlen):
    B, T, H, K = x.shape
    BC = min(SUB_CHUNK, BT)
    NT = varlen.NT if varlen is not None else triton.cdiv(T, BT)
    return B, T, H, K, BC, BT // BC, min(next_pow2(K), 64), NT


def pairwise_fwd(x: torch.Tensor, y: torch.Tensor, G: torch.Tensor, xscale: float, BT: int,
                 strict: bool, varlen=None, second=None):
    """``M`` ``[B, T, H, BT]`` float32 (see the module docstring); ``varlen``
    (``utils.Varlen``): packed documents, whose chunks never straddle a boundary. ``second =
    (x2, xscale2, strict2)`` computes a second product of ``x2`` with the same ``y`` in the same
    pass (``strict`` must then be off) and returns ``(M, M2)``."""
    B, T, H, K, BC, NC, BKP, NT = _sizes(x, BT, varlen)
    out = torch.empty(B, T, H, BT, dtype=torch.float32, device=x.device)
    x2, xscale2, strict2 = second if second is not None else (x, 1.0, False)
    if second is not None and strict:
        raise ValueError("pairwise_fwd: a second product needs strict=False for the first")
    out2 = torch.empty_like(out) if second is not None else out
    launch(pairwise_fwd_kernel, (NT, B * H, NC),
        x, x2, y, G, out, out2, *varlen_pointers(varlen, x), xscale, xscale2, T, H=H, K=K,
        BT=BT, BC=BC, BKP=BKP, NC=NC, STRICT=strict, TWO=second is not None, STRICT2=strict2,
        IP=dot_precision(x.dtype), IS_VARLEN=varlen is not None,
        num_warps=PAIR_WARPS["fwd2" if second is not None else "fwd"])
    return (out, out2) if second is not None else out


def pairwise_bwd(dM: torch.Tensor, x: torch.Tensor, y: torch.Tensor, G: torch.Tensor,
                 xscale: float, BT: int, dx: torch.Tensor, dy: torch.Tensor,
                 dG: torch.Tensor, varlen=None, second=None) -> None:
    """Add the gradients of ``pairwise_fwd`` into float32 ``dx``, ``dy`` (may be ``dx``), ``dG``.
    ``second = (dM2, xscale2)``: also the gradient of the strict product of ``y`` with itself
    (the second product of ``pairwise_fwd(x, y, ..., second=(y, xscale2, True))``), added into
    ``dy`` in the same pass (``dx`` must then not be ``dy``)."""
    B, T, H, K, BC, NC, BKP, NT = _sizes(x, BT, varlen)
    if second is not None and dx is dy:
        raise ValueError("pairwise_bwd: a second gradient needs separate dx and dy")
    dM2, xscale2 = second if second is not None else (dM, 1.0)
    launch(pairwise_bwd_kernel, (NT, B * H, NC),
        dM, dM2, x, y, G, dx, dy, dG, *varlen_pointers(varlen, x), xscale, xscale2, T, H=H,
        K=K, BT=BT, BC=BC, BKP=BKP, NC=NC, SAME=dx is dy, TWO=second is not None,
        IP=dot_precision(x.dtype), IS_VARLEN=varlen is not None,
        num_warps=PAIR_WARPS["bwd2" if second is not None else "bwd"])
