"""Chunkwise forward and backward of both families, as one autograd function over the kernels.

Forward (``state.py`` has the notation)::

    G     = chunk-local cumsum of g                               (gate.py)
    A, P  = overflow-safe pairwise products (per-channel gate)    (pairwise.py)
    Ai    = (I + L)^{-1} per chunk, no gate or one per head        (the delta rule's stages,
    W, U  = WY form of the delta rule                               delta_net/stages.py)
    pairs of the P sequence segments, scan, outputs per segment    (state.py)

Backward recomputes ``G``, ``W``, ``U`` (from the kept ``Ai`` where there is one) and the
per-chunk states ``h`` from the saved segment start states (in parallel over segments), runs the
reverse state pass the same way (pairs of gradient segments scanned with ``A_p^T``), then the
per-chunk gradient kernels. Only the inputs, the segment start states ``[B, H, P, K, V]``, the
segment transitions and ``Ai`` are kept between the two.

Packed documents (``cu_seqlens``, ``B = 1``) follow fla's convention: chunks never straddle a
document (``utils.Varlen``: the table of (document, chunk), built once per offsets tensor), the
per-chunk kernels take ``IS_VARLEN`` and read each chunk's document start and length from the
offsets, and the state passes run one program per (segment, head, value block) over a
segment table (``utils.Segments``): a short document is one segment, a long one is cut into
segments like a dense sequence (pairs of its segments, a scan along each document, then the
outputs from the true starts), so one long document among short ones does not run its whole
length in one program. Initial and final states are per document, ``[N, H, K, V]``. Dense calls
build the ``IS_VARLEN=False`` kernels, which never read the offsets.
"""

from __future__ import annotations

import torch
import triton

from ..kinds import Gate
from .gate import chunk_cumsum, chunk_reverse_cumsum
from .grad import grad_kernel
from .pairwise import pairwise_bwd, pairwise_fwd
from .state import local_dr_kernel, state_bwd_kernel, state_fwd_kernel
from .scan import segment_scan
from .utils import (
    Varlen,
    choose_doc_segments,
    choose_segments,
    dot_precision,
    grad_block_k,
    grad_num_warps,
    next_pow2,
    launch,
    state_block_v,
    state_num_warps,
    varlen_pointers,
)


class _Cfg:
    """Shapes and block sizes of one call."""

    def __init__(self, q, v, g, beta, chunk_size, num_segments, varlen: Varlen | None,
                 stages=None):
        self.B, self.T, self.H, self.K = q.shape
        self.V = v.shape[-1]
        self.dtype = q.dtype
        self.BT = chunk_size
        self.varlen = varlen
        # chunks over all sequences (per batch row, or in total over packed documents)
        self.NT = varlen.NT if varlen is not None else triton.cdiv(self.T, self.BT)
        self.gate = Gate.of(g)
        self.delta = beta is not None
        if self.delta and stages is None:
            raise ValueError("chunk_forward: the delta rule (beta given) needs its family's stages "
                             "(kernels/delta_net/stages.py); call lsp.kernels.delta_rule")
        self.stages = stages  # the family's own stages (the delta rule's WY form), or None
        self.BK = next_pow2(self.K)
        self.BV = state_block_v(self.BK, self.V)
        self.NV = triton.cdiv(self.V, self.BV)
        self.IP = dot_precision(q.dtype)
        self.warps = state_num_warps(self.BK)
        self.segs = None
        if varlen is not None:  # documents cut into segments (see the module docstring)
            self.P, self.SEG = 1, self.NT
            self.segs = varlen.segments(*choose_doc_segments(varlen.doc_chunks, self.H, self.NV,
                                                             q.device, num_segments))
        else:
            self.P, self.SEG = choose_segments(self.B, self.H, self.NV, self.NT, q.device,
                                               num_segments)
        self.scan_kind = 2 if self.delta else (1 if self.gate else 0)
        # the delta rule with no gate or one per head takes the WY kernels of wy.py
        self.fast_wy = self.delta and self.gate != Gate.KEY

    def consts(self):
        return dict(H=self.H, K=self.K, V=self.V, BT=self.BT, BK=self.BK, BV=self.BV,
                    IS_VARLEN=self.varlen is not None)

    def chunk_pointers(self, dummy):
        """``(cu_seqlens, chunk_indices)`` for the per-chunk kernels."""
        return varlen_pointers(self.varlen, dummy)

    def state_pointers(self, dummy, table):
        """``(cu_seqlens, segment table)`` for the state passes."""
        if self.varlen is None:
            return dummy, dummy
        return self.varlen.cu_seqlens, table

    @property
    def split(self) -> bool:
        """Packed documents of which at least one is cut into several segments."""
        return self.segs is not None and self.segs.NS > self.varlen.N


def _prepare(cfg: _Cfg, q, k, v, beta, g, scale, store_ta: bool, Ai=None):
    """Recomputable per-chunk quantities: G, the per-channel pairwise products, W and U (and
    ``Ai``, which the scalar-gate delta rule computes once in the forward and keeps)."""
    vl = cfg.varlen
    G = chunk_cumsum(g, cfg.BT, vl) if cfg.gate else None
    Aqk = Pm = None
    if cfg.gate == Gate.KEY and cfg.delta and FUSE_PAIRWISE:  # both in one pass over k and G
        Aqk, Pm = pairwise_fwd(q, k, G, scale, cfg.BT, strict=False, varlen=vl,
                               second=(k, 1.0, True))
    elif cfg.gate == Gate.KEY:
        Aqk = pairwise_fwd(q, k, G, scale, cfg.BT, strict=False, varlen=vl)
        if cfg.delta:
            Pm = pairwise_fwd(k, k, G, 1.0, cfg.BT, strict=True, varlen=vl)
    w = u = TA = None
    if cfg.delta:
        w, u, TA, Ai = cfg.stages.wy_forward(cfg, k, v, beta, G, Pm, store_ta, Ai)
    return G, Aqk, Pm, w, u, TA, Ai


def _state_fwd(cfg, mode, q, k, u, w, G, Aqk, o, h, r, s0, s_end, a_pair, seg_dec, scale,
               store_end=False, table=None):
    """One forward state pass over the batch rows' segments, or over the rows of a packed
    segment table (``table``; default: every segment)."""
    extra = triton.cdiv(cfg.K, cfg.BV) if (mode == 0 and cfg.delta) else 0
    P = cfg.P
    d = q  # stand-in for pointers a mode does not use
    table, rows = _rows(cfg, table)
    launch(state_fwd_kernel, (cfg.NV + extra, rows * cfg.H, P),
        q, k, u, w if w is not None else d, G if G is not None else d,
        Aqk if Aqk is not None else d, o if o is not None else d, h if h is not None else d,
        r if r is not None else d, s0 if s0 is not None else d,
        s_end if s_end is not None else d, a_pair if a_pair is not None else d,
        seg_dec if seg_dec is not None else d, *cfg.state_pointers(d, table),
        scale, cfg.T, cfg.NT, cfg.SEG, cfg.P, NV=cfg.NV, GATE=cfg.gate, DELTA=cfg.delta,
        MODE=mode, HAS_S0=s0 is not None, STORE_END=store_end, IP=cfg.IP,
        num_warps=cfg.warps, **cfg.consts())


def _rows(cfg, table):
    """``(table, its row count)``: the segment table a packed pass runs over (every segment by
    default), or the batch rows of a dense call."""
    if cfg.segs is None:
        return None, cfg.B
    table = cfg.segs.table if table is None else table
    return table, table.shape[0]


def _scan_segments(cfg, M, Y, X0, dec, reverse: bool):
    """The affine scan of ``scan.segment_scan`` for packed documents cut into segments.

    ``M``, ``Y``, ``dec`` are per row of ``segs.split`` (the segments of the documents that were
    cut); the result ``X`` ``[NS, H, K, V]`` holds each segment's start state (its end-state
    gradient when ``reverse``): a document's first (last) segment takes ``X0`` of the document
    (or zero), the others go in steps along the documents, all documents at once.
    """
    sg = cfg.segs
    shape = (sg.NS, cfg.H, cfg.K, cfg.V)
    if X0 is None:
        X = torch.zeros(shape, dtype=torch.float32, device=Y.device)
    else:  # a tensor value (a Python scalar here would be a host-to-device copy and a sync)
        X = torch.empty(shape, dtype=torch.float32, device=Y.device)
        X[sg.last if reverse else sg.first] = X0
    for tgt, src, row in (sg.bwd if reverse else sg.fwd):
        x = X[src]
        if cfg.scan_kind == 2:
            m = M[row].transpose(-1, -2) if reverse else M[row]
            x = torch.matmul(m, x) + Y[row]
        elif cfg.scan_kind == 1:
            x = torch.addcmul(Y[row], dec[row].exp().unsqueeze(-1), x)
        else:
            x = x + Y[row]
        X[tgt] = x
    return X


def _scan_prefix(cfg, M, Y, dec, reverse: bool):
    """The segment pairs folded into prefix pairs, for a state that arrives from elsewhere.

    Forward: ``Pre[p] = M_{p-1} ... M_0`` and ``Z[p]`` the zero-start state at segment ``p``'s
    start, so that the true start is ``Pre[p] S + Z[p]`` for any slice start ``S``; the slice's
    own pair ``(M_{P-1} ... M_0, its zero-start end state)`` comes with them. Reverse (``M_p^T``,
    from the last segment): ``Pre[p] = (M_{P-1} ... M_{p+1})^T`` and ``Z[p]`` the gradient at
    segment ``p``'s end from the later segments' outputs, so that the true end gradient is
    ``Pre[p] D + Z[p]`` for the gradient ``D`` at the slice's end; the pair is then
    ``((M_{P-1} ... M_0)^T, the gradient at the slice's start from its own outputs)``.

    ``M`` as in ``scan.segment_scan``: the delta rule's ``[K, K]`` (one augmented ``[K, K + V]``
    product per segment: the ``K`` columns carry the transition, the ``V`` the state), a decay
    ``exp(dec)`` per key channel (``Pre`` and the transition ``[B, H, P, K]`` / ``[B, H, K]``),
    or the identity (``Pre`` and the transition None). float32. Returns ``(Pre, Z, A, B)``.
    """
    B, H, P, K, V = cfg.B, cfg.H, cfg.P, cfg.K, cfg.V
    order = range(P - 1, -1, -1) if reverse else range(P)
    if cfg.scan_kind == 2:
        X = torch.empty(B, H, P, K, K + V, dtype=torch.float32, device=Y.device)
        x = torch.zeros(B * H, K, K + V, dtype=torch.float32, device=Y.device)
        x[:, :, :K] = torch.eye(K, dtype=torch.float32, device=Y.device)
        for p in order:
            X[:, :, p] = x.view(B, H, K, K + V)
            m = M[:, :, p].reshape(B * H, K, K)
            x = torch.bmm(m.transpose(-1, -2) if reverse else m, x)
            x[:, :, K:] += Y[:, :, p].reshape(B * H, K, V)
        x = x.view(B, H, K, K + V)
        return X[..., :K], X[..., K:], x[..., :K], x[..., K:]
    Z = torch.empty(B, H, P, K, V, dtype=torch.float32, device=Y.device)
    z = torch.zeros(B, H, K, V, dtype=torch.float32, device=Y.device)
    for p in order:
        Z[:, :, p] = z
        z = (torch.addcmul(Y[:, :, p], dec[:, :, p].exp().unsqueeze(-1), z)
             if cfg.scan_kind == 1 else z + Y[:, :, p])
    if cfg.scan_kind == 0:
        return None, Z, None, z
    # the log-decay between the slice's edge and each segment (exclusive sums, no subtraction)
    zero = torch.zeros_like(dec[:, :, :1])
    if reverse:
        cum = dec.flip(2).cumsum(2).flip(2)
        pre = torch.cat([cum[:, :, 1:], zero], 2)
    else:
        cum = dec.cumsum(2)
        pre = torch.cat([zero, cum[:, :, :-1]], 2)
    return pre.exp(), Z, cum[:, :, 0 if reverse else P - 1].exp(), z


def _from_prefix(Pre, Z, S):
    """``Pre[p] S + Z[p]`` for every segment ``p`` (one batched product, or a scaling)."""
    if Pre is None:
        return Z + S.unsqueeze(2)
    if Pre.dim() == 4:  # a decay per key channel
        return torch.addcmul(Z, Pre.unsqueeze(-1), S.unsqueeze(2))
    return torch.matmul(Pre, S.unsqueeze(2)) + Z


# The per-channel-gated delta rule computes its two pairwise products (``Aqk``, ``Akk``) and
# their gradients in one pass each (shared loads and exponentials, as fla's KDA kernels do);
# ``False`` runs them separately (the A/B: ``launch/ab_pairwise.py`` at fbc8daa, docs/results.md).
FUSE_PAIRWISE = True

# ``grad_kernel`` runs without software pipelining: on Hopper (Triton 3.6) its pipelined build
# at BK = 64 returned a wrong ``dw``, differing from run to run (docs/results.md, 2026-11-26).
# Pipelined it is 0.1-1 ms faster at T = 64K (2026-12-01), but one passing correctness run
# cannot rule out an intermittent fault, so it stays off.
GRAD_KERNEL_STAGES = 1

# ``True``: ``grad_kernel`` takes ``dA^T`` (no per-channel gate) through a scratch buffer in the
# input dtype instead of a second product over the value columns (one of five products per value
# block fewer, a ``[B, T, H, 64]`` buffer more). Measured in a same-run A/B (``python -m
# lsp.launch.ab_kernels``, H200, T = 64K, docs/results.md 2026-12-01 sixth session): the kernel
# 2.03 -> 1.77 ms (DeltaNet), 2.80 -> 2.35 (Gated DeltaNet), 1.23 -> 1.07 (linear attention),
# 2.11 -> 1.82 (simple GLA), every correctness case green: on.
GRAD_DAT_VIA_MEMORY = True
# (The scalar-gate gradient as ``q . dq - k . dk`` instead of a ``q k^T`` product was no faster,
# 2.71 vs 2.80 ms, and beside ``GRAD_DAT_VIA_MEMORY`` its bf16 ``dg`` error rose to 1.1-1.5e-2,
# over the 1e-2 tolerance, in 5 of 22 cases: removed after that A/B.)
# value columns per step of its loop (``None``: the state passes' ``BV``, 64 at ``K <= 128``;
# fla's ``dqkwg`` takes 128 on Hopper, one step at ``V = 128``). 128 was mixed (DeltaNet faster,
# Gated DeltaNet slower than 64) and its correctness run did not finish: off.
GRAD_BLOCK_V = None


def _state_bwd(cfg, mode, q, k, w, G, Aqk, do, dh, dr, ds0, scale, table=None):
    table, rows = _rows(cfg, table)
    ds_start = torch.empty(rows, cfg.H, cfg.P, cfg.K, cfg.V, dtype=torch.float32,
                           device=q.device)
    d = q
    launch(state_bwd_kernel, (cfg.NV, rows * cfg.H, cfg.P),
        q, k, w if w is not None else d, G if G is not None else d,
        Aqk if Aqk is not None else d, do, dh if dh is not None else d,
        dr if dr is not None else d, ds0 if ds0 is not None else d, ds_start,
        *cfg.state_pointers(d, table), scale, cfg.T, cfg.NT, cfg.SEG, cfg.P, GATE=cfg.gate,
        DELTA=cfg.delta, MODE=mode, HAS_DS0=ds0 is not None, IP=cfg.IP,
        num_warps=cfg.warps, **cfg.consts())
    return ds_start


class ChunkFunction(torch.autograd.Function):
    """Autograd wrapper; ``beta is None`` selects additive linear attention."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, output_final_state, chunk_size,
                num_segments, cu_seqlens, boundary, stages):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        beta = beta.contiguous() if beta is not None else None
        g = g.contiguous() if g is not None else None
        varlen = Varlen.of(cu_seqlens, chunk_size) if cu_seqlens is not None else None
        cfg = _Cfg(q, v, g, beta, chunk_size, num_segments, varlen, stages)
        B, H, K, V, P = cfg.B, cfg.H, cfg.K, cfg.V, cfg.P
        f32 = dict(dtype=torch.float32, device=q.device)
        init = None
        if initial_state is not None:
            init = initial_state.detach().to(torch.float32).contiguous()
        G, Aqk, Pm, w, u, _, Ai = _prepare(cfg, q, k, v, beta, g, scale, store_ta=False)
        if not cfg.delta:
            u = v

        a_pair = seg_dec = None
        final = None
        own_final = False
        if boundary is not None:  # a rank of a sequence-parallel group (see chunk_forward)
            b_pair = torch.empty(B, H, P, K, V, **f32)
            a_pair = torch.empty(B, H, P, K, K, **f32) if cfg.delta else None
            seg_dec = torch.empty(B, H, P, K, **f32) if (cfg.gate and not cfg.delta) else None
            _state_fwd(cfg, 0, q, k, u, w, G, Aqk, None, None, None, None, b_pair, a_pair,
                       seg_dec, scale)
            pre, zs, a_rank, b_rank = _scan_prefix(cfg, a_pair, b_pair, seg_dec, reverse=False)
            del b_pair
            if cfg.gate == Gate.HEAD and not cfg.delta:  # one decay per head: A is [B, H]
                a_rank = a_rank[..., 0].contiguous()
            s_start, final = boundary.forward(a_rank, b_rank, init)
            own_final = output_final_state and final is None  # this slice's own end state
            s0 = _from_prefix(pre, zs, s_start)
            del pre, zs
        elif cfg.split:  # packed documents, some cut into segments: their pairs, then the scan
            R = cfg.segs.split.shape[0]
            b_pair = torch.empty(R, H, K, V, **f32)
            a_pair = torch.empty(R, H, K, K, **f32) if cfg.delta else None
            seg_dec = torch.empty(R, H, K, **f32) if (cfg.gate and not cfg.delta) else None
            _state_fwd(cfg, 0, q, k, u, w, G, Aqk, None, None, None, None, b_pair, a_pair,
                       seg_dec, scale, table=cfg.segs.split)
            s0 = _scan_segments(cfg, a_pair, b_pair, init, seg_dec, reverse=False)
            del b_pair
        elif P > 1:
            b_pair = torch.empty(B, H, P, K, V, **f32)
            a_pair = torch.empty(B, H, P, K, K, **f32) if cfg.delta else None
            seg_dec = torch.empty(B, H, P, K, **f32) if (cfg.gate and not cfg.delta) else None
            _state_fwd(cfg, 0, q, k, u, w, G, Aqk, None, None, None, None, b_pair, a_pair,
                       seg_dec, scale)
            s0 = segment_scan(cfg.scan_kind, a_pair, b_pair, init, seg_dec, reverse=False)
            del b_pair
        else:
            s0 = init
        o = torch.empty_like(v)
        # a rank's final state comes from the exchange, unless it hands none (own_final)
        store_end = output_final_state and (boundary is None or own_final)
        if store_end:
            final = torch.empty(cfg.varlen.N if varlen is not None else B, H, K, V, **f32)
        _state_fwd(cfg, 1, q, k, u, w, G, Aqk, o, None, None, s0, final if store_end else None,
                   None, None, scale, store_end=store_end)

        ctx.save_for_backward(q, k, v, beta, g, s0, a_pair, seg_dec, Ai)
        ctx.cfg = cfg
        ctx.scale = scale
        ctx.boundary = boundary
        ctx.own_final = own_final
        ctx.has_init = initial_state is not None
        ctx.init_dtype = initial_state.dtype if initial_state is not None else None
        if final is None:
            return o
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal=None):
        q, k, v, beta, g, s0, a_pair, seg_dec, Ai = ctx.saved_tensors
        cfg, scale = ctx.cfg, ctx.scale
        B, T, H, K, V, P, BT, NT = cfg.B, cfg.T, cfg.H, cfg.K, cfg.V, cfg.P, cfg.BT, cfg.NT
        vl = cfg.varlen
        dev = q.device
        f32 = dict(dtype=torch.float32, device=dev)
        do = do.contiguous()
        if dfinal is not None:
            dfinal = dfinal.to(torch.float32).contiguous()

        G, Aqk, Pm, w, u, TA, _ = _prepare(cfg, q, k, v, beta, g, scale, store_ta=True, Ai=Ai)
        if not cfg.delta:
            u = v
        # per-chunk states from the saved segment starts (parallel over segments)
        h = torch.empty(B, NT, H, K, V, dtype=q.dtype, device=dev)
        r = torch.empty_like(v) if cfg.delta else None
        _state_fwd(cfg, 2, q, k, u, w, G, Aqk, None, h, r, s0, None, None, None, scale)

        # reverse pass: each chunk's own part of dR in parallel (dr = A^T dO, completed in place
        # by the last pass), local segment gradients, reverse scan, then per-chunk gradients
        dr = torch.empty_like(v)
        launch(local_dr_kernel, (NT, B * H), q, k, G if G is not None else q,
               Aqk if Aqk is not None else q, do, dr, *cfg.chunk_pointers(q), scale, T,
               GATE=cfg.gate, IP=cfg.IP, num_warps=4, **cfg.consts())
        boundary = ctx.boundary
        if boundary is not None:  # this slice's gradient pair, the reverse exchange, true ends
            d_loc = _state_bwd(cfg, 0, q, k, w, G, Aqk, do, None, dr, None, scale)
            pre, zs, a_t, g_rank = _scan_prefix(cfg, a_pair, d_loc, seg_dec, reverse=True)
            del d_loc
            if ctx.own_final and dfinal is not None:  # this slice's own end state was returned:
                # its gradient reaches the slice start through A^T (as one more segment would),
                # and adds to the end's
                a_t = None if a_t is None else a_t.unsqueeze(2)
                g_rank = _from_prefix(a_t, g_rank.unsqueeze(2), dfinal)[:, :, 0]
                d_end = boundary.backward(g_rank.contiguous(), None) + dfinal
            else:
                d_end = boundary.backward(g_rank.contiguous(), dfinal)
            ds0 = _from_prefix(pre, zs, d_end)
            del pre, zs
        elif cfg.split:
            d_loc = _state_bwd(cfg, 0, q, k, w, G, Aqk, do, None, dr, None, scale,
                               table=cfg.segs.split)
            ds0 = _scan_segments(cfg, a_pair, d_loc[:, :, 0], dfinal, seg_dec, reverse=True)
            del d_loc
        elif P > 1:
            d_loc = _state_bwd(cfg, 0, q, k, w, G, Aqk, do, None, dr, None, scale)
            ds0 = segment_scan(cfg.scan_kind, a_pair, d_loc, dfinal, seg_dec, reverse=True)
            del d_loc
        else:
            ds0 = dfinal
        dh = torch.empty(B, NT, H, K, V, dtype=q.dtype, device=dev)
        ds_start = _state_bwd(cfg, 1, q, k, w, G, Aqk, do, dh, dr, ds0, scale)
        if ctx.has_init:  # a document's first segment (every batch row's first segment)
            first = ds_start[cfg.segs.first] if cfg.segs is not None else ds_start
            dinit = first[:, :, 0].to(ctx.init_dtype)
            if boundary is not None and not boundary.first:  # the state before the whole
                dinit = torch.zeros_like(dinit)  # sequence enters on the group's first rank
        else:
            dinit = None

        vec = cfg.gate == Gate.KEY
        dq = torch.empty(q.shape, **f32) if vec else torch.empty_like(q)
        dk = torch.empty(k.shape, **f32) if (vec or cfg.delta) else torch.empty_like(k)
        # dW in the input dtype where the WY backward rounds it to that anyway (wy.py), float32
        # for the per-channel gate's backward (intra.py), which multiplies it in float32
        dw = (torch.empty(k.shape, dtype=k.dtype if cfg.fast_wy else torch.float32, device=dev)
              if cfg.delta else dq)
        # the per-chunk gradients in blocks of key columns (utils.grad_block_k); the scalar
        # gate's gradients are sums over the key columns: one part per block, summed here
        BKG = grad_block_k(cfg.BK, cfg.gate == Gate.HEAD)
        NK = triton.cdiv(K, BKG)
        scalar_g = cfg.gate == Gate.HEAD
        final_g = scalar_g and not cfg.delta and NK == 1
        parts = NK if scalar_g else 1
        dG = (torch.empty((parts,) + tuple(g.shape), **f32) if (cfg.gate and not final_g)
              else dq)
        dGl = (torch.empty((parts, B, NT, H) + tuple(g.shape[3:]), **f32) if cfg.gate else dq)
        dg = torch.empty_like(g) if final_g or (scalar_g and cfg.delta) else None
        dAqk = torch.empty(B, T, H, BT, **f32) if vec else dq
        dat_mem = GRAD_DAT_VIA_MEMORY and not vec
        scratch = torch.empty(B, T, H, BT, dtype=q.dtype, device=dev) if dat_mem else dq
        launch(grad_kernel, (NT, B * H, NK),
            q, k, r if cfg.delta else v, G if G is not None else q, h, dh, do, dr, dq, dk, dw,
            dG, dGl, dg if dg is not None else dq, dAqk, scratch, *cfg.chunk_pointers(q), scale,
            T, NT, B * T * H, B * NT * H, GATE=cfg.gate,
            DELTA=cfg.delta, FINAL_G=final_g, IP=cfg.IP, DAT_MEM=dat_mem,
            num_warps=grad_num_warps(BKG), num_stages=GRAD_KERNEL_STAGES,
            **dict(cfg.consts(), BK=BKG, BV=GRAD_BLOCK_V or cfg.BV))
        del scratch
        del h, dh
        if cfg.gate and not final_g:
            dG, dGl = (x.sum(0) if parts > 1 else x[0] for x in (dG, dGl))
        if scalar_g and not cfg.delta and not final_g:  # linear attention, several key blocks
            dg = chunk_reverse_cumsum(dG, dGl, BT, g.dtype, varlen=vl)
        if vec and not (cfg.delta and FUSE_PAIRWISE):
            pairwise_bwd(dAqk, q, k, G, scale, BT, dq, dk, dG, varlen=vl)
            del dAqk

        dbeta = None
        if cfg.delta:
            dv = torch.empty_like(v)
            dbeta = torch.empty_like(beta)
            dk_out = dk if vec else torch.empty_like(k)
            dP = torch.empty(B, T, H, BT, **f32) if vec else dk
            if cfg.fast_wy:  # the scalar-gate WY backward reads Ai, not W and U: free them
                w = u = None
            cfg.stages.wy_backward(cfg, k, v, beta, G, Ai, TA, Pm, w, u, dw, dr, dk, dk_out, dv,
                                   dbeta, dG, dGl, dg if dg is not None else dk, dP)
            dk = dk_out
            if vec and FUSE_PAIRWISE:  # both gradients in one pass (the WY backward adds)
                pairwise_bwd(dAqk, q, k, G, scale, BT, dq, dk, dG, varlen=vl, second=(dP, 1.0))
                del dAqk, dP
            elif vec:
                pairwise_bwd(dP, k, k, G, 1.0, BT, dk, dk, dG, varlen=vl)
        else:
            dv = dr
        if vec:
            dg = chunk_reverse_cumsum(dG, dGl, BT, g.dtype, varlen=vl)
        return (dq.to(q.dtype), dk.to(k.dtype), dv, dbeta, dg, dinit, None, None, None, None,
                None, None, None)


def chunk_forward(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size,
                  num_segments, cu_seqlens=None, boundary=None, stages=None):
    """Run :class:`ChunkFunction`; returns ``(o, final_state or None)``; with ``cu_seqlens``
    the states are per document, ``[N, H, K, V]``. ``stages``: the family's own stages, which
    ``common/`` does not import (the delta rule's WY form, ``delta_net/stages.py``: required
    with ``beta``; linear attention has none).

    ``boundary``: the call is one rank's contiguous slice of a longer sequence (dense). The
    slice's start state then comes from the other ranks, through the same segment machinery
    that runs the in-GPU split: the segments' pairs (``MODE=0``) fold into the slice's
    pair ``(A, B)``, ``boundary.forward(A, B, initial_state)`` returns ``(S_start, S_final)``
    (the exclusive scan over the ranks; ``initial_state`` is the state before the whole
    sequence, ``S_final`` the state after it or None), and the outputs run from the true segment
    starts. With ``output_final_state``, the returned state is ``S_final``, or this slice's own
    end state when the boundary hands none (packed documents: a document ending on this rank).
    The backward does the same in reverse: ``boundary.backward(G, dS_final)`` takes the
    gradient ``G`` at the slice start from its own outputs and returns the gradient at its end
    from everything after it; ``boundary.first`` says whether this slice holds the sequence
    start (the others return a zero gradient for ``initial_state``). ``A`` is the delta rule's
    ``[B, H, K, K]``, a decay ``[B, H]`` (one per head) or ``[B, H, K]`` (per key channel), or
    None (no decay), as ``lsp.parallel``'s transition kinds. So a delta-rule rank pays one pass
    of ``K`` extra columns over its segments (the in-GPU split pays it anyway whenever it cuts
    the slice) instead of the whole op at value width ``V + K``, and a linear-attention rank no
    effective-query correction. ``lsp.parallel`` supplies the object; the kernels import
    nothing of it.
    """
    if boundary is not None and cu_seqlens is not None:
        raise ValueError("chunk_forward: a sequence-parallel boundary takes a dense slice; "
                         "packed documents run one per shard stretch (lsp.parallel)")
    out = ChunkFunction.apply(q, k, v, beta, g, initial_state, scale, output_final_state,
                              chunk_size, num_segments, cu_seqlens, boundary, stages)
    if output_final_state:
        return out
    return out, None
