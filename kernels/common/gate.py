"""Chunk-local cumulative sums of the log-decay ``g`` (forward) and their reverse (backward).

``G[t] = sum_{s in chunk(t), s <= t} g[s]`` in float32, ``[B, T, H]`` (one decay per head) or
``[B, T, H, K]`` (per key channel). The backward turns the per-token gradients ``dG`` plus the
gradient ``dGl`` of each chunk's total decay (it lands on the chunk's last token) into
``dg[t] = sum_{s in chunk(t), s >= t} dG[s] + dGl[chunk(t)]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import chunk_program, varlen_pointers


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_cumsum_kernel(g, G, dGl, cu_seqlens, chunk_indices, T, NT, H: tl.constexpr,
                        KG: tl.constexpr, BKG: tl.constexpr, BT: tl.constexpr,
                        VECTOR: tl.constexpr, REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Grid ``(NT, B*H, cdiv(KG, BKG))``; packed documents (``IS_VARLEN``, ``B = 1``): one
    program per row of ``chunk_indices``, ``dGl`` indexed by that global chunk."""
    i_t, i_bh, i_h, i_c, bos, T = chunk_program(T, NT, cu_seqlens, chunk_indices, H, IS_VARLEN)
    i_k = tl.program_id(2)
    o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)
    m_t = o_t < T
    if VECTOR:
        o_k = i_k * BKG + tl.arange(0, BKG)
        m = m_t[:, None] & (o_k < KG)[None, :]
        off = ((bos + o_t) * H + i_h)[:, None] * KG + o_k[None, :]
        x = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
        if REVERSE:
            tail = tl.load(dGl + (i_c * H + i_h) * KG + o_k, mask=o_k < KG, other=0.0)
            y = tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0) + x + tail[None, :]
        else:
            y = tl.cumsum(x, axis=0)
        tl.store(G + off, y.to(G.dtype.element_ty), mask=m)
    else:
        off = (bos + o_t) * H + i_h
        x = tl.load(g + off, mask=m_t, other=0.0).to(tl.float32)
        if REVERSE:
            tail = tl.load(dGl + i_c * H + i_h)
            y = tl.sum(x, axis=0) - tl.cumsum(x, axis=0) + x + tail
        else:
            y = tl.cumsum(x, axis=0)
        tl.store(G + off, y.to(G.dtype.element_ty), mask=m_t)


def _grid(B, T, H, KG, BKG, BT, vector, varlen):
    NT = varlen.NT if varlen is not None else triton.cdiv(T, BT)
    return NT, (NT, B * H, triton.cdiv(KG, BKG) if vector else 1)


def chunk_cumsum(g: torch.Tensor, BT: int, varlen=None) -> torch.Tensor:
    """float32 chunk-local inclusive cumsum of ``g`` ``[B,T,H]`` or ``[B,T,H,K]``; ``varlen``
    (``utils.Varlen``, packed documents) makes the chunks those of each document."""
    g = g.contiguous()
    B, T, H = g.shape[:3]
    vector = g.dim() == 4
    KG = g.shape[3] if vector else 1
    BKG = min(triton.next_power_of_2(KG), 64) if vector else 1
    G = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    NT, grid = _grid(B, T, H, KG, BKG, BT, vector, varlen)
    cu, ci = varlen_pointers(varlen, g)
    chunk_cumsum_kernel[grid](g, G, G, cu, ci, T, NT, H=H, KG=KG, BKG=BKG, BT=BT, VECTOR=vector,
                              REVERSE=False, IS_VARLEN=varlen is not None)
    return G


def chunk_reverse_cumsum(dG: torch.Tensor, dGl: torch.Tensor, BT: int,
                         out_dtype: torch.dtype, varlen=None) -> torch.Tensor:
    """``dg`` from per-token ``dG`` and per-chunk ``dGl`` (``[B, NT, H(, K)]``), both float32."""
    B, T, H = dG.shape[:3]
    vector = dG.dim() == 4
    KG = dG.shape[3] if vector else 1
    BKG = min(triton.next_power_of_2(KG), 64) if vector else 1
    dg = torch.empty(dG.shape, dtype=out_dtype, device=dG.device)
    NT, grid = _grid(B, T, H, KG, BKG, BT, vector, varlen)
    cu, ci = varlen_pointers(varlen, dG)
    chunk_cumsum_kernel[grid](dG, dg, dGl, cu, ci, T, NT, H=H, KG=KG, BKG=BKG, BT=BT,
                              VECTOR=vector, REVERSE=True, IS_VARLEN=varlen is not None)
    return dg
