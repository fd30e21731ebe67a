"""Chunkwise PyTorch form shared by both op families (the ``backend="torch"`` path).

Both families are one recurrence over a matrix state ``S`` ``[K, V]`` per head, with a decay
``a_t = exp(g_t)`` (none, one per head, or one per key channel) applied first::

    linear attention: S_t = diag(a_t) S_{t-1} + k_t v_t^T
    delta rule:       S_t = (I - b_t k_t k_t^T) diag(a_t) S_{t-1} + b_t k_t v_t^T
    output:           o_t = scale * S_t^T q_t

Split the sequence into chunks of ``C`` tokens. Inside a chunk let ``G_t`` be the cumulative
log-decay from the chunk start through token ``t`` (``G_0 = 0`` before the first token) and
``S_0`` the state at the chunk start. Writing the delta rule's update as
``S_t = diag(a_t) S_{t-1} + k_t r_t^T`` with the residual ``r_t = b_t (v_t - (diag(a_t) S_{t-1})^T k_t)``
and unrolling gives, with ``γ_t = exp(G_t)``::

    S_t = diag(γ_t) S_0 + Σ_{j<=t} diag(γ_t / γ_j) k_j r_j^T
    (I + L) R = diag(b) V - diag(b) (K ⊙ Γ) S_0,   L[t, j] = b_t Σ_c k_tc k_jc γ_tc/γ_jc  (j < t)

so ``R = U - W S_0`` with the WY quantities ``U = (I+L)^{-1} diag(b) V`` and
``W = (I+L)^{-1} diag(b) (K ⊙ Γ)``. For additive linear attention ``R = V`` (``W = 0``). Then::

    O      = (Q ⊙ Γ) S_0 + A_qk R,               A_qk[t, j] = Σ_c q_tc k_jc γ_tc/γ_jc  (j <= t)
    S_C    = diag(γ_C) S_0 + (K ⊙ γ_C / Γ)^T R

The intra-chunk parts are batched over all chunks; only the chunk-to-chunk state recurrence is a
Python loop. Pairwise decays ``γ_t / γ_j`` are formed as ``exp(G_t - G_j)`` with the upper
triangle masked to ``-inf`` *before* the exponential, so no factor ever exceeds 1 (for ``g <= 0``)
and very negative gates neither overflow nor produce NaN gradients. For per-key-channel gates this
materialises ``[C, C, K]`` per chunk: the torch path is the readable reference and the CPU path,
not the fast one (that is ``lsp.kernels``).

Everything is computed in float32, or float64 when the inputs are float64; outputs are returned
in the dtype of ``v`` and the final state in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsp.kernels.kinds import Gate, clamp_full_forget

DEFAULT_CHUNK_SIZE = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (fp32 / bf16 / fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """``[B, T, H, ...]`` -> ``[B, H, N, C, ...]``, zero-padded at the end to ``N*C`` tokens.

    Zero padding is exact for both families: a padded token has ``k = v = q = 0``, ``beta = 0``
    and ``g = 0`` (decay 1), so it leaves the state unchanged and its output is dropped.
    """
    B, T = x.shape[:2]
    N = -(-T // chunk_size)
    pad = N * chunk_size - T
    if pad:
        x = torch.cat([x, x.new_zeros((B, pad) + tuple(x.shape[2:]))], dim=1)
    x = x.reshape((B, N, chunk_size) + tuple(x.shape[2:]))
    # [B, N, C, H, ...] -> [B, H, N, C, ...]
    return x.movedim(3, 1)


def from_chunks(x: Tensor, T: int) -> Tensor:
    """``[B, H, N, C, D]`` -> ``[B, T, H, D]`` (drops the padding)."""
    B, H, N, C = x.shape[:4]
    return x.movedim(1, 3).reshape((B, N * C, H) + tuple(x.shape[4:]))[:, :T]


class ChunkGates:
    """Per-chunk decay factors for a gate ``g`` (log space) in chunked layout.

    ``G`` is the inclusive cumulative log-decay inside each chunk: ``[B, H, N, C]`` for one decay
    per head, ``[B, H, N, C, K]`` per key channel, ``None`` without decay.
    """

    def __init__(self, g_chunks: Tensor | None):
        self.kind = (Gate.NONE if g_chunks is None
                     else Gate.HEAD if g_chunks.dim() == 4 else Gate.KEY)
        self.dtype = None if g_chunks is None else g_chunks.dtype
        # The cumulative sum is kept in float64: with strong decays G reaches hundreds inside a
        # chunk and float32 differences G_t - G_j would lose ~1e-4 of relative accuracy. Every
        # exponent below is a difference taken in float64 and then cast to the compute dtype.
        self.G = None if g_chunks is None else g_chunks.double().cumsum(dim=3)

    def _exp(self, x: Tensor) -> Tensor:
        return x.to(self.dtype).exp()

    def _per_channel(self, x: Tensor) -> Tensor:
        # broadcast G against a [..., C, K] tensor
        return x if self.kind == Gate.KEY else x.unsqueeze(-1)

    def decay_from_start(self, x: Tensor) -> Tensor:
        """``x_t ⊙ γ_t``: rows of ``x [B,H,N,C,K]`` times the decay from the chunk start."""
        if self.G is None:
            return x
        return x * self._exp(self._per_channel(self.G))

    def decay_to_end(self, x: Tensor) -> Tensor:
        """``x_t ⊙ γ_C / γ_t``: rows of ``x [B,H,N,C,K]`` times the decay to the chunk end."""
        if self.G is None:
            return x
        G = self._per_channel(self.G)
        return x * self._exp(G[:, :, :, -1:] - G)

    def chunk_decay(self) -> Tensor | None:
        """``γ_C`` shaped to scale states ``[B, H, N, K, V]`` row-wise: ``[B,H,N,1,1]`` or ``[B,H,N,K,1]``."""
        if self.G is None:
            return None
        last = self._exp(self.G[:, :, :, -1])
        return last.unsqueeze(-1) if self.kind == Gate.KEY else last[..., None, None]

    def pairwise(self, x: Tensor, y: Tensor, strict: bool) -> Tensor:
        """``M[t, j] = Σ_c x_tc y_jc γ_tc/γ_jc`` for ``j <= t`` (``j < t`` if strict), else 0.

        ``x``, ``y``: ``[B, H, N, C, K]``; returns ``[B, H, N, C, C]``.
        """
        C = x.shape[3]
        mask = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
        if self.G is None:
            return (x @ y.transpose(-1, -2)).masked_fill(~mask, 0.0)
        if self.kind == Gate.HEAD:
            diff = self.G.unsqueeze(-1) - self.G.unsqueeze(-2)  # [B,H,N,C,C]
            decay = self._exp(diff.masked_fill(~mask, float("-inf")))
            return (x @ y.transpose(-1, -2)) * decay
        diff = self.G.unsqueeze(-2) - self.G.unsqueeze(-3)  # [B,H,N,C,C,K]
        decay = self._exp(diff.masked_fill(~mask.unsqueeze(-1), float("-inf")))
        return torch.einsum("bhnik,bhnjk,bhnijk->bhnij", x, y, decay)


def chunk_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise forward of either family; autograd differentiates it (initial state included).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``None``, ``[B, T, H]`` or ``[B, T, H, K]``, log-space decay.
        beta: ``[B, T, H]`` for the delta rule, ``None`` for additive linear attention.
        scale: multiplies the queries.
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros).
        output_final_state: return the state after the last token.
        chunk_size: tokens per chunk ``C`` (any T; the tail is zero-padded).

    Returns:
        ``o`` ``[B, T, H, V]`` in ``v.dtype`` and the final state ``[B, H, K, V]`` in the compute
        dtype (float32, or float64 for float64 inputs), or ``None``.
    """
    ct = compute_dtype(q.dtype)
    B, T, H, K = q.shape
    V = v.shape[-1]

    qc = to_chunks(q.to(ct) * scale, chunk_size)  # [B,H,N,C,K]
    kc = to_chunks(k.to(ct), chunk_size)
    vc = to_chunks(v.to(ct), chunk_size)  # [B,H,N,C,V]
    # clamp_full_forget: g = -inf (a full forget) is exact, not NaN (lsp.kernels.kinds)
    gates = ChunkGates(None if g is None else to_chunks(clamp_full_forget(g.to(ct)), chunk_size))
    N = qc.shape[2]

    if beta is None:
        U, W = vc, None
    else:
        bc = to_chunks(beta.to(ct), chunk_size).unsqueeze(-1)  # [B,H,N,C,1]
        # (I + L): unit lower-triangular; the solver reads only its strict lower part.
        eye = torch.eye(chunk_size, dtype=ct, device=q.device)
        IL = eye + bc * gates.pairwise(kc, kc, strict=True)
        U = torch.linalg.solve_triangular(IL, bc * vc, upper=False, unitriangular=True)
        W = torch.linalg.solve_triangular(
            IL, bc * gates.decay_from_start(kc), upper=False, unitriangular=True
        )

    Aqk = gates.pairwise(qc, kc, strict=False)  # [B,H,N,C,C]
    qg = gates.decay_from_start(qc)  # [B,H,N,C,K]
    kd = gates.decay_to_end(kc).transpose(-1, -2)  # [B,H,N,K,C]
    gC = gates.chunk_decay()

    if initial_state is None:
        S = q.new_zeros((B, H, K, V), dtype=ct)
    else:
        S = initial_state.to(ct)

    outs = []
    for n in range(N):
        R = U[:, :, n] if W is None else U[:, :, n] - W[:, :, n] @ S
        outs.append(qg[:, :, n] @ S + Aqk[:, :, n] @ R)
        S = (S if gC is None else gC[:, :, n] * S) + kd[:, :, n] @ R
    o = from_chunks(torch.stack(outs, dim=2), T).to(v.dtype)
    return o, (S if output_final_state else None)
