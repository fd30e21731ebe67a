"""An independent cross-check of the state exchange with MPI's own exclusive scan.

``mpi_exscan_states`` computes the same exclusive scan of affine pairs as
``lsp.parallel.exchange`` but with ``MPI_Exscan`` (and ``MPI_Allreduce`` for the final state) and
a user-defined, non-commutative MPI operator, through mpi4py. MPI defines the order in which a
non-commutative operator combines the ranks' values, so this is an implementation of the scan
that shares no communication code with the torch.distributed one; ``tests/parallel/mpi_exscan_main.py``
runs both under ``mpiexec`` and compares them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lsp.parallel import pairs


def _pack(kind: str, A: Tensor | None, B: Tensor) -> np.ndarray:
    parts = [B.detach().double().reshape(-1)]
    if kind != "identity":
        parts.insert(0, A.detach().double().reshape(-1))
    return torch.cat(parts).numpy().copy()


def _unpack(kind: str, buf: np.ndarray, A_like: Tensor | None, B_like: Tensor):
    t = torch.from_numpy(np.asarray(buf, dtype=np.float64))
    nA = 0 if kind == "identity" else A_like.numel()
    A = None if kind == "identity" else t[:nA].view(A_like.shape)
    return A, t[nA:].view(B_like.shape)


def mpi_exscan_states(kind: str, A: Tensor | None, B: Tensor, S_init: Tensor | None, comm=None):
    """``(S_start, S_final)`` of this rank from MPI's Exscan / Allreduce of the packed pairs.

    ``kind`` is the transition kind (``lsp.parallel.pairs.KINDS``); ``A``, ``B`` this rank's pair
    and ``S_init`` the state before rank 0 (None: zeros). Computed in float64.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    A_like = None if kind == "identity" else A.detach().double()
    B_like = B.detach().double()

    def combine(inbuf, inoutbuf, datatype):
        # MPI: inoutbuf <- inbuf (from lower ranks) op inoutbuf; the pair of the lower ranks
        # acts first, so the result is inout ∘ in = (A2 A1, A2 B1 + B2).
        a1, b1 = _unpack(kind, np.frombuffer(inbuf, dtype=np.float64), A_like, B_like)
        out = np.frombuffer(inoutbuf, dtype=np.float64)
        a2, b2 = _unpack(kind, out.copy(), A_like, B_like)
        a, b = pairs.compose(kind, a2, b2, a1, b1)
        out[:] = _pack(kind, a, b)

    op = MPI.Op.Create(combine, commute=False)
    try:
        mine = _pack(kind, A, B)
        prefix = np.zeros_like(mine)
        comm.Exscan(mine, prefix, op=op)
        total = np.zeros_like(mine)
        comm.Allreduce(mine, total, op=op)
    finally:
        op.Free()
    S0 = torch.zeros_like(B_like) if S_init is None else S_init.detach().double()
    if comm.Get_rank() == 0:  # Exscan leaves rank 0's result undefined: the empty prefix
        S_start = S0
    else:
        Ap, Bp = _unpack(kind, prefix, A_like, B_like)
        S_start = pairs.apply(kind, Ap, S0) + Bp
    At, Bt = _unpack(kind, total, A_like, B_like)
    return S_start, pairs.apply(kind, At, S0) + Bt
