"""The affine scan over the in-GPU sequence segments, one kernel launch per direction.

A state pass split into ``P`` segments (``utils.choose_segments``) runs every segment from a zero
state and gets each segment's affine pair ``(M_p, Y_p)``; the true start state of segment ``p``
is then the scan ``x_0 = X0``, ``x_{p+1} = M_p x_p + Y_p`` (the reverse pass: from the last
segment, with ``M_p^T``). ``P - 1`` dependent steps of small tensors: written as a torch loop it
was ``2-3 (P - 1)`` launches per direction (96 at ``P = 17``), each a few microseconds of GPU work
behind a launch on the host, so the GPU waited on Python between the two state passes (the
profile of 2026-12-01: 0.15 ms of GPU time, ~0.6 ms of wall time at T = 64K). Here one program per
``[BK, BV]`` tile of the state runs all ``P`` steps. Hand-written because no library has an
affine scan of matrices (torch's ``associative_scan`` needs a compiler and is log-depth over
products we do not need).

``M`` is the delta rule's ``[K, K]`` transition (``segment_scan_product_kernel``), ``exp(dec)``
a per-key-channel decay, or the identity (``segment_scan_kernel``). Everything in float32, the
products exact (``ieee``), as the torch loop they replace.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import launch, next_pow2


@triton.jit
def segment_scan_kernel(Y, X0, dec, X, P, K: tl.constexpr, V: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, KIND: tl.constexpr,
                        REVERSE: tl.constexpr, HAS_X0: tl.constexpr):
    """``X[b, h, p]`` = the scan's state at segment ``p`` for the ``[BK, BV]`` tile of this
    program (``KIND`` 0: ``x + Y_p``; 1: ``exp(dec_p) * x + Y_p``). ``Y`` and ``X``
    ``[B, H, P, K, V]``, ``X0`` ``[B, H, K, V]``, ``dec`` ``[B, H, P, K]``, contiguous."""
    i_v, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk = rk < K
    m2 = mk[:, None] & (rv < V)[None, :]
    tile = rk[:, None] * V + rv[None, :]
    XY = i_bh * P * K * V
    if HAS_X0:
        x = tl.load(X0 + i_bh * K * V + tile, mask=m2, other=0.0)
    else:
        x = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(P - 1):
        if REVERSE:
            p = P - 1 - i
        else:
            p = i
        tl.store(X + XY + p * K * V + tile, x, mask=m2)
        y = tl.load(Y + XY + p * K * V + tile, mask=m2, other=0.0)
        if KIND == 1:
            d = tl.load(dec + i_bh * P * K + p * K + rk, mask=mk, other=0.0)
            x = tl.exp(d)[:, None] * x + y
        else:
            x = x + y
    if REVERSE:
        p_last = 0
    else:
        p_last = P - 1
    tl.store(X + XY + p_last * K * V + tile, x, mask=m2)


@triton.jit
def segment_scan_product_kernel(M, Y, X0, X, P, K: tl.constexpr, V: tl.constexpr,
                                BR: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
                                HAS_X0: tl.constexpr):
    """The delta rule's scan ``x_{p+1} = M_p x_p + Y_p`` (``M_p^T`` when ``REVERSE``) for the
    ``BV`` value columns of this program. A ``[K, K]`` transition and a ``[K, BV]`` state do not
    fit one program's registers (an in-register build spilled ~9 KB a thread at K = 128), so each
    step reads the state it just wrote back from ``X`` in ``[BR, BV]`` blocks (L1/L2 hits) and
    writes the next one block of rows at a time; a CTA barrier between steps makes one step's
    stores visible to the next step's loads (CUDA's ``__syncthreads`` guarantee for global
    memory). ``M`` ``[B, H, P, K, K]``, the rest as in :func:`segment_scan_kernel`."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    rv = i_v * BV + tl.arange(0, BV)
    mv = rv < V
    rr = tl.arange(0, BR)
    XY = i_bh * P * K * V
    if REVERSE:
        p0 = P - 1
    else:
        p0 = 0
    for i_r0 in tl.static_range(0, K, BR):
        rows = i_r0 + rr
        m2 = (rows < K)[:, None] & mv[None, :]
        tile = rows[:, None] * V + rv[None, :]
        if HAS_X0:
            x = tl.load(X0 + i_bh * K * V + tile, mask=m2, other=0.0)
        else:
            x = tl.zeros([BR, BV], dtype=tl.float32)
        tl.store(X + XY + p0 * K * V + tile, x, mask=m2)
    tl.debug_barrier()
    for i in range(P - 1):
        if REVERSE:
            p = P - 1 - i
            p_next = p - 1
        else:
            p = i
            p_next = i + 1
        Mp = M + (i_bh * P + p) * K * K
        for i_r in range(0, K, BR):
            rows = i_r + rr
            mr = rows < K
            m2 = mr[:, None] & mv[None, :]
            tile = rows[:, None] * V + rv[None, :]
            acc = tl.load(Y + XY + p * K * V + tile, mask=m2, other=0.0)
            for i_c in range(0, K, BR):
                cols = i_c + rr
                mc = cols < K
                mm = mr[:, None] & mc[None, :]
                if REVERSE:  # m[i, j] = M_p[j, i]
                    m = tl.load(Mp + cols[None, :] * K + rows[:, None], mask=mm, other=0.0)
                else:
                    m = tl.load(Mp + rows[:, None] * K + cols[None, :], mask=mm, other=0.0)
                xc = tl.load(X + XY + p * K * V + cols[:, None] * V + rv[None, :],
                             mask=mc[:, None] & mv[None, :], other=0.0)
                acc += tl.dot(m, xc, input_precision="ieee")
            tl.store(X + XY + p_next * K * V + tile, acc, mask=m2)
        tl.debug_barrier()


def segment_scan(kind: int, M, Y, X0, dec, reverse: bool) -> torch.Tensor:
    """The scan's states ``X`` ``[B, H, P, K, V]`` (float32) from the segment pairs ``Y``
    ``[B, H, P, K, V]`` and ``M`` ``[B, H, P, K, K]`` (``kind`` 2, the delta rule), ``dec``
    ``[B, H, P, K]`` (``kind`` 1, a decay) or neither (``kind`` 0); ``X0`` None for a zero
    start."""
    B, H, P, K, V = Y.shape
    Y = Y.contiguous()
    X = torch.empty_like(Y)
    x0 = X0.contiguous() if X0 is not None else Y
    if kind == 2:  # B * H * V / 16 programs; each step K^2 * 16 multiply-adds in [64, 64]
        BV = 16    # blocks above K = 64 (at K = 64 that build spilled, [32, 32] does not)
        launch(segment_scan_product_kernel, (triton.cdiv(V, BV), B * H), M.contiguous(), Y, x0,
               X, P, K=K, V=V, BR=64 if K > 64 else 32, BV=BV, REVERSE=reverse,
               HAS_X0=X0 is not None, num_warps=4, num_stages=1)
        return X
    BK, BV = min(next_pow2(K), 64), 32
    launch(segment_scan_kernel, (triton.cdiv(V, BV), triton.cdiv(K, BK), B * H), Y, x0,
           dec.contiguous() if kind == 1 else Y, X, P, K=K, V=V, BK=BK, BV=BV, KIND=kind,
           REVERSE=reverse, HAS_X0=X0 is not None, num_warps=4, num_stages=1)
    return X
