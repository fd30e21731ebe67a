"""The delta rule's own stages of the chunkwise op, which ``common/chunk.py`` composes with the
shared ones (``chunk.py`` of this family hands it this module): the WY form forward
(``wy_forward``: ``Ai``, ``W``, ``U`` from ``wy.py`` with no gate or one per head, the
per-channel-gate intra pass of ``intra.py`` otherwise) and its backward (``wy_backward``), with
their launch configurations and the switches under A/B (``launch/ab_kernels.py``).
"""

from __future__ import annotations

import torch

from ..common.utils import SUB_CHUNK, grad_num_warps, launch, next_pow2
from . import intra, wy

# The delta rule's WY backward keeps float32 [BT, K] tiles; above this K they do not fit in an
# H100's shared memory (K = 256 asks for 288 KiB), so the key dim goes in blocks.
WY_SINGLE_TILE_MAX_K = 128
WY_BLOCK_K = 64

# Launch configuration of the scalar-gate WY kernels (``delta_net/wy.py``): warps per kernel and
# the widest block of their loops over key / value columns (fixed, so the interpreter runs the
# same code). W/U at 8 warps, 128 wide with a 64-wide backward was not faster once the state
# passes ran at 4 warps (H200, docs/results.md), so the GPU-checked configuration stays.
WY_FAST = dict(kkt_warps=1, kkt_bk=64, wu_warps=4, wu_bk=64, bwd_warps=4, bwd_bk=32)
# Its backward's ``dL = -Ai^T dAi Ai^T`` with operands in the input dtype instead of float32
# (``WY_DL_INPUT_DTYPE``, as fla's): 1.43 -> 1.39 ms (DeltaNet) and 1.70 -> 1.63 ms (Gated
# DeltaNet) at T = 64K in a same-run A/B (``python -m lsp.launch.ab_kernels``, H200,
# docs/results.md 2026-12-01 sixth session), every correctness case green. (Keeping ``Ai^T dW``
# in the float32 ``dk`` buffer between the two key loops was slower, 1.66 / 2.03 ms, and was
# removed after that A/B.)
WY_DL_INPUT_DTYPE = True


def _intra(cfg, k, v, beta, G, Pm, store_ta: bool):
    B, T, H = cfg.B, cfg.T, cfg.H
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    TA = (torch.empty(B, T, H, cfg.BT, dtype=torch.float32, device=k.device) if store_ta else w)
    BC = min(SUB_CHUNK, cfg.BT)
    launch(intra.intra_fwd_kernel, (cfg.NT, B * H),
        k, v, beta, G if G is not None else k, Pm if Pm is not None else k, w, u, TA,
        *cfg.chunk_pointers(k), T, H=H, K=cfg.K, V=cfg.V, BT=cfg.BT, BC=BC, NC=cfg.BT // BC,
        BKI=min(cfg.BK, 64), BVI=min(next_pow2(cfg.V), 64), GATE=cfg.gate, STORE_TA=store_ta,
        IP=cfg.IP, IS_VARLEN=cfg.varlen is not None, num_warps=4)
    return w, u, (TA if store_ta else None)


def _kkt_solve(cfg, k, beta, G):
    """``Ai = (I + L)^{-1}`` per chunk, ``[B, T, H, BT]`` in the input dtype (wy.py)."""
    Ai = torch.empty(cfg.B, cfg.T, cfg.H, cfg.BT, dtype=k.dtype, device=k.device)
    BC = min(SUB_CHUNK, cfg.BT)
    launch(wy.kkt_solve_kernel, (cfg.NT, cfg.B * cfg.H),
        k, beta, G if G is not None else k, Ai, *cfg.chunk_pointers(k), cfg.T, H=cfg.H, K=cfg.K,
        BT=cfg.BT, BC=BC, NC=cfg.BT // BC, BK=min(cfg.BK, WY_FAST["kkt_bk"]), GATE=cfg.gate,
        IS_VARLEN=cfg.varlen is not None, IP=cfg.IP, num_warps=WY_FAST["kkt_warps"])
    return Ai


def _wu(cfg, k, v, beta, G, Ai):
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    launch(wy.wu_kernel, (cfg.NT, cfg.B * cfg.H),
        k, v, beta, G if G is not None else k, Ai, w, u, *cfg.chunk_pointers(k), cfg.T,
        H=cfg.H, K=cfg.K, V=cfg.V, BT=cfg.BT,
        BW=min(max(cfg.BK, next_pow2(cfg.V)), WY_FAST["wu_bk"]), GATE=cfg.gate,
        IS_VARLEN=cfg.varlen is not None, IP=cfg.IP, num_warps=WY_FAST["wu_warps"])
    return w, u


def wy_forward(cfg, k, v, beta, G, Pm, store_ta: bool, Ai=None):
    """``(W, U, TA, Ai)``: the WY form of every chunk. With no gate or one per head ``Ai`` is
    computed when not given (the forward keeps it for the backward) and ``TA`` is None; with a
    per-channel gate ``Ai`` stays None and ``TA`` is stored when ``store_ta``."""
    if cfg.fast_wy:
        if Ai is None:
            Ai = _kkt_solve(cfg, k, beta, G)
        w, u = _wu(cfg, k, v, beta, G, Ai)
        return w, u, None, Ai
    w, u, TA = _intra(cfg, k, v, beta, G, Pm, store_ta)
    return w, u, TA, None


def wy_backward(cfg, k, v, beta, G, Ai, TA, Pm, w, u, dw, dr, dk, dk_out, dv, dbeta, dG, dGl,
                dg, dP):
    """The WY form's backward: ``dk_out``, ``dv``, ``dbeta`` and the gate gradient from ``dW``,
    ``dR`` (``dr``) and the float32 partial ``dk`` of the other kernels; with a per-channel gate
    the ``dP`` of the pairwise product, which the caller finishes."""
    B, T, H, K, V, BT, NT, vl = cfg.B, cfg.T, cfg.H, cfg.K, cfg.V, cfg.BT, cfg.NT, cfg.varlen
    if cfg.fast_wy:  # reads Ai, not W and U (the caller has dropped them)
        scratch = torch.empty_like(Ai)
        launch(wy.wy_bwd_scalar_kernel, (NT, B * H), k, v, beta,
               G if G is not None else k, Ai, dw, dr, dk, dk_out, dv, dbeta, dG, dGl, dg,
               scratch, *cfg.chunk_pointers(k), T, NT,
               H=H, K=K, V=V, BT=BT,
               BW=min(max(cfg.BK, next_pow2(V)), WY_FAST["bwd_bk"]), GATE=cfg.gate,
               IS_VARLEN=vl is not None, IP=cfg.IP, DL_LOW=WY_DL_INPUT_DTYPE,
               num_warps=WY_FAST["bwd_warps"])
    else:
        wy_args = (k, v, beta, G if G is not None else k, TA,
                   Pm if Pm is not None else k, w, u, dw, dr, dk, dk_out, dv, dbeta, dG,
                   dGl, dg, dP, *cfg.chunk_pointers(k), T, NT)
        if cfg.BK <= WY_SINGLE_TILE_MAX_K:
            launch(intra.wy_bwd_kernel, (NT, B * H), *wy_args, H=H, K=K, V=V, BT=BT,
                   BK=cfg.BK, BV=cfg.BV, GATE=cfg.gate, IP=cfg.IP,
                   IS_VARLEN=vl is not None, num_warps=grad_num_warps(cfg.BK))
        else:
            launch(intra.wy_bwd_blocked_kernel, (NT, B * H), *wy_args, H=H, K=K, V=V, BT=BT,
                   BKW=min(cfg.BK, WY_BLOCK_K), BV=min(cfg.BV, 64), GATE=cfg.gate,
                   IP=cfg.IP, IS_VARLEN=vl is not None, num_warps=8)
