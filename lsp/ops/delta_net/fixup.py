"""Transition and effective queries of a delta-rule stretch, without a second state pass.

Sequence parallelism needs, for the tokens a rank holds, the transition ``P_N`` (``S_end = P_N
S_start + B``) and the effective queries ``qe_t = scale * A_{0..t}^T q_t`` (``o_t = o0_t + qe_t
S_start``). Both are linear in nothing but ``q, k, beta, g``, so they come from the chunkwise
(WY) quantities alone, with no ``[K, V]`` state pass. Per chunk ``c`` of ``C`` tokens (notation
of ``lsp.ops.common.chunk``: ``Γ`` the decay from the chunk start, ``Γ_C`` at its end, per key
channel for vector gates)::

    W   = (I + L)^{-1} diag(b) (K ⊙ Γ)                   the WY factor of the keys
    M   = causal(Q K^T ⊙ Γ_i / Γ_j), diagonal included
    A_c = diag(Γ_C) - (K ⊙ Γ_C / Γ)^T W                  [K, K]: h_{c+1} = A_c h_c + B_c
    Q̃_c = Q ⊙ Γ - M W                                    [C, K]: o_c = Q̃_c h_c + (zero-start part)

and with the prefix products ``P_0 = I``, ``P_{c+1} = A_c P_c``: the transition is ``P_N`` and
``qe_c = scale * Q̃_c P_c``.

The prefix products are a scan of ``[K, K]`` matrices, done work-efficiently in three phases so
that the sequential depth is about ``2 sqrt(N)`` steps for ``N`` chunks and every step is one
large batched matmul:

1. chunks are cut into blocks of ``nb`` consecutive chunks; all blocks advance together, step
   ``j`` taking chunk ``j`` of every block: ``Y = W L``, ``L <- Γ_C L - k̄^T Y`` (the low-rank form
   of ``L <- A_c L``; no ``A_c`` is formed) and ``Z_c = Q̃_c L`` from the same matmul as ``Y``. This
   gives each block's local exclusive prefixes applied to its queries, and its total;
2. a log-depth (Hillis–Steele) scan of the block totals gives each block's start ``P_b``;
3. ``qe_c = scale * Z_c P_b``, one matmul per block.

Memory stays bounded: the blocks x steps grid is cut into groups whose working set (the ``[C, C]``
or, for vector gates, ``[C, C, K]`` pairwise terms, the ``[C, K]`` rows, the ``L`` of each step)
fits ``group_bytes``, and under autograd each group is checkpointed (recomputed in the backward),
so what stays saved is ``O(T K)`` rows plus one ``L`` per block and group. Gradients come from
autograd through this code. Decays are formed as in ``lsp.ops.common.chunk`` (differences of a
float64 cumulative log-decay, masked before the exponential), so gates of 0 or of -1000 per token
neither overflow nor give NaN gradients. Everything is float32 (float64 for float64 inputs). The
scan phases are written by hand: torch has no associative scan of matrices.

Status: this is the tested torch reference of the algebra. ``sequence_parallel`` does not use it
yet: on an H200 these torch ops cost more than the ``V + K`` state pass they are meant to replace
(docs/results.md, 2026-11-30), so the pass stays until a fused (Triton) version beats it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lsp.ops.common.chunk import DEFAULT_CHUNK_SIZE, ChunkGates, compute_dtype, from_chunks

# Working memory of one group of chunks (bytes): bounds the [C, C, K] pairwise decays of vector
# gates and the per-step L of a group under autograd, whatever T is.
DEFAULT_GROUP_BYTES = 1 << 30


def _pad_chunks(x: Tensor, n_chunks: int, chunk_size: int) -> Tensor:
    """``[B, T, H, ...]`` -> ``[B, H, n_chunks, C, ...]``, zero-padded (exact: a padded token has
    ``k = q = 0``, ``beta = 0``, ``g = 0``, so ``A_c = I`` past the end and its rows are dropped)."""
    B, T = x.shape[:2]
    pad = n_chunks * chunk_size - T
    if pad:
        x = torch.cat([x, x.new_zeros((B, pad) + tuple(x.shape[2:]))], dim=1)
    return x.reshape((B, n_chunks, chunk_size) + tuple(x.shape[2:])).movedim(3, 1)


def _chunk_terms(qc: Tensor, kc: Tensor, bc: Tensor, gc: Tensor | None):
    """WY factor ``W``, keys to the chunk end ``k̄``, chunk decay ``Γ_C`` and ``Q̃`` of chunks.

    Inputs ``[B, H, n, C, K]`` (``bc`` ``[B, H, n, C]``, ``gc`` as ``ChunkGates`` takes it);
    ``Γ_C`` is ``None``, ``[B, H, n, 1, 1]`` or ``[B, H, n, K, 1]`` (scales ``[K, K]`` row-wise).
    """
    gates = ChunkGates(gc)
    C = kc.shape[-2]
    eye_c = torch.eye(C, dtype=kc.dtype, device=kc.device)
    bcol = bc.unsqueeze(-1)
    IL = eye_c + bcol * gates.pairwise(kc, kc, strict=True)
    W = torch.linalg.solve_triangular(IL, bcol * gates.decay_from_start(kc), upper=False,
                                      unitriangular=True)
    Qt = gates.decay_from_start(qc) - gates.pairwise(qc, kc, strict=False) @ W
    return W, gates.decay_to_end(kc), gates.chunk_decay(), Qt


def _group_scan(qc: Tensor, kc: Tensor, bc: Tensor, gc: Tensor | None, L: Tensor):
    """Phase 1 over ``s`` consecutive chunks of ``m`` blocks at once, from block prefixes ``L``.

    Chunk inputs ``[B, H, m, s, C, ...]``, ``L [B, H, m, K, K]``. Each step is the low-rank form
    of ``L <- A_c L``: ``Y = W L``, ``L <- Γ_C L - k̄^T Y`` (no ``[K, K]`` ``A_c`` is formed), and
    ``Z_c = Q̃_c L`` comes from the same matmul as ``Y``. Returns ``Z [B, H, m, s, C, K]`` and the
    advanced ``L``.
    """
    m, s, C = kc.shape[2:5]
    flat = lambda x: None if x is None else x.flatten(2, 3)  # noqa: E731
    W, kbar, gC, Qt = _chunk_terms(flat(qc), flat(kc), flat(bc), flat(gc))
    unflat = lambda x: None if x is None else x.unflatten(2, (m, s))  # noqa: E731
    # unbind, not indexing: the backward of s index selects would zero-fill s full-size
    # gradients; unbind's is one stack
    WQ = torch.cat([W, Qt], dim=-2).unflatten(2, (m, s)).unbind(3)  # s x [B, H, m, 2C, K]
    kbarT = unflat(kbar).transpose(-1, -2).unbind(3)  # s x [B, H, m, K, C]
    gC = [None] * s if gC is None else unflat(gC).unbind(3)
    Z = []
    for WQ_j, kbarT_j, gC_j in zip(WQ, kbarT, gC):
        Y, Zj = (WQ_j @ L).split(C, dim=-2)
        Z.append(Zj)
        L = (L if gC_j is None else gC_j * L) - kbarT_j @ Y
    return torch.stack(Z, dim=3), L


def _exclusive_scan(tot: Tensor) -> tuple[Tensor, Tensor]:
    """Hillis–Steele scan of ``tot [B, H, n, K, K]`` (later factors on the left).

    Returns the exclusive prefixes ``[B, H, n, K, K]`` (identity first) and the full product.
    """
    n, K = tot.shape[2], tot.shape[-1]
    inc = tot
    d = 1
    while d < n:
        inc = torch.cat([inc[:, :, :d], inc[:, :, d:] @ inc[:, :, :-d]], dim=2)
        d *= 2
    eye = torch.eye(K, dtype=tot.dtype, device=tot.device).expand(tot.shape[:2] + (1, K, K))
    return torch.cat([eye, inc[:, :, :-1]], dim=2), inc[:, :, -1]


def delta_rule_transition(
    q: Tensor,
    k: Tensor,
    beta: Tensor,
    g: Tensor | None,
    *,
    scale: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_chunks: int | None = None,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    recompute: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(P_N, qe)`` of a delta-rule stretch: ``S_end = P_N S_start + B`` and ``o = o0 + qe S_start``.

    Args:
        q, k: ``[B, T, H, K]``; beta: ``[B, T, H]``; g: ``None``, ``[B, T, H]`` or
            ``[B, T, H, K]`` (log space), as for ``lsp.ops.delta_rule``.
        scale: the op's query scale (included in ``qe``).
        chunk_size: tokens per chunk ``C`` (any ``T``; the tail is zero-padded).
        block_chunks: chunks per scan block ``nb`` (default ``isqrt(N)`` for ``N`` chunks: about
            ``sqrt(N)`` sequential steps in phase 1 and ``log2(sqrt(N))`` in phase 2).
        group_bytes: working memory of one group of chunks (see above).
        recompute: checkpoint each group under autograd (saved memory ``O(T K)``); ``False``
            keeps every group's intermediates instead (about ``K^2 + 10 C K`` floats per chunk
            and head) and skips the recomputation in the backward.

    Returns:
        ``P_N`` ``[B, H, K, K]`` and ``qe`` ``[B, T, H, K]``, float32 (float64 for float64 inputs).
    """
    for name, val in (("chunk_size", chunk_size), ("group_bytes", group_bytes)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"delta_rule_transition: {name}={val!r}; pass an int >= 1")
    if block_chunks is not None and (isinstance(block_chunks, bool)
                                     or not isinstance(block_chunks, int) or block_chunks < 1):
        raise ValueError(f"delta_rule_transition: block_chunks={block_chunks!r}; pass an int >= 1 "
                         "or None (about sqrt(T / chunk_size))")
    ct = compute_dtype(q.dtype)
    Bsz, T, H, K = q.shape
    C = chunk_size
    N = -(-T // C)
    nb = min(N, block_chunks if block_chunks is not None else max(1, math.isqrt(N)))
    n_blocks = -(-N // nb)
    # bytes one chunk holds while its group is live under autograd: the [C, C] (vector gates:
    # [C, C, K]) pairwise terms with their masks and exponentials, the [C, K] rows, its L
    elt = torch.finfo(ct).bits // 8
    pair_cc = C * C * (K if g is not None and g.dim() == 4 else 1)
    per_chunk = Bsz * H * elt * (2 * K * K + 6 * pair_cc + 12 * C * K)
    cap = max(1, group_bytes // per_chunk)
    blocks_per_group = min(n_blocks, cap)
    steps_per_group = max(1, min(nb, cap // blocks_per_group))

    def chunks(x: Tensor) -> Tensor:  # [B, T, H, ...] -> [B, H, n_blocks, nb, C, ...]
        return _pad_chunks(x.to(ct), n_blocks * nb, C).unflatten(2, (n_blocks, nb))

    qc, kc, bc = chunks(q) * scale, chunks(k), chunks(beta)
    gc = None if g is None else chunks(g)
    use_ckpt = recompute and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, beta, g))
    eye = torch.eye(K, dtype=ct, device=q.device)

    def tiles(x: Tensor | None) -> list:
        # one split per axis: its backward is one concatenation, where per-group indexing
        # would zero-fill a full-size gradient for every group
        if x is None:
            return [[None] * -(-nb // steps_per_group)] * -(-n_blocks // blocks_per_group)
        return [xb.split(steps_per_group, dim=3) for xb in x.split(blocks_per_group, dim=2)]

    Z_rows, totals = [], []
    for row in zip(*(tiles(x) for x in (qc, kc, bc, gc))):
        L = eye.expand(Bsz, H, row[0][0].shape[2], K, K)
        Zs = []
        for tile in zip(*row):
            Z, L = (checkpoint(_group_scan, *tile, L, use_reentrant=False) if use_ckpt
                    else _group_scan(*tile, L))
            Zs.append(Z)
        Z_rows.append(torch.cat(Zs, dim=3))
        totals.append(L)
    starts, P_N = _exclusive_scan(torch.cat(totals, dim=2))
    Z = torch.cat(Z_rows, dim=2)  # [B, H, n_blocks, nb, C, K]
    qe = (Z.flatten(3, 4) @ starts).reshape(Bsz, H, n_blocks * nb, C, K)
    return P_N, from_chunks(qe, T)
