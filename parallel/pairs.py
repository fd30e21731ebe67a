"""Affine pairs ``(A, B)`` of a rank's slice and the effective queries, per op family.

Over the tokens ``[t0, t1)`` that a rank holds, every family's state update is affine::

    S_end = A S_start + B           (A acts on the key dim of S [B, H, K, V])
    o_t   = o0_t + qe_t @ S_start   (qe_t = scale * A_{t0..t}^T q_t, the effective query)

where ``o0`` and ``B`` are the slice's outputs and final state from a zero start. The transition
``A`` comes in four kinds, which decide what crosses the wire:

============  ==================  ================================================
kind          ``A`` tensor        families
============  ==================  ================================================
identity      ``None``            linear attention without decay
scalar        ``[B, H]``          one decay per head (Lightning, RetNet, Mamba-2)
diagonal      ``[B, H, K]``       per-key-channel decay (GLA)
full          ``[B, H, K, K]``    the delta rules (DeltaNet, Gated DeltaNet, KDA-like)
============  ==================  ================================================

For the linear-attention family everything has a closed form: ``A = exp(sum g)``,
``qe = scale * q * exp(cumsum g)`` and ``B = (k * exp(G_end - G_t))^T v``, one GEMM per head,
so the pair is ready long before the local outputs and the exchange can run while they are
computed. For the delta rules ``A`` is a product of ``T`` full ``[K, K]`` factors; it and ``qe``
come from the chunkwise (WY) pass itself: the op is linear in ``(v, S_start)`` jointly and value
columns evolve independently, so one call with values ``[v | 0_K]`` and initial state
``[0 | I_K]`` returns ``[o0 | qe]`` as its output and ``[B | A]`` as its final state. This needs
nothing from the op but its public contract, so it works for every backend at the cost of
``V + K`` instead of ``V`` value columns. ``sequence_parallel`` uses these pairs on the torch
path and for packed stretches beside a document boundary; on the Triton kernels both families
instead run the exchange inside the op (``sequence._KernelBoundary``), where the in-GPU segment
split already computes the segments' pairs, so a rank costs about one op.

Pairs are kept in float32 (float64 for float64 inputs), whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lsp.kernels.kinds import clamp_full_forget
from lsp.parallel.contract import Family, OpCall, OpSpec, Transition

KINDS = tuple(t.value for t in Transition)


def apply(kind: str, A: Tensor | None, S: Tensor) -> Tensor:
    """``A S`` for a state (or state block) ``S [B, H, K, Vb]``."""
    if kind == "identity":
        return S
    if kind == "scalar":
        return A[..., None, None] * S
    if kind == "diagonal":
        return A[..., None] * S
    return A @ S


def apply_adjoint(kind: str, A: Tensor | None, D: Tensor) -> Tensor:
    """``A^T D`` for a state gradient (or block) ``D [B, H, K, Vb]``."""
    if kind == "full":
        return A.transpose(-1, -2) @ D
    return apply(kind, A, D)  # identity, scalar and diagonal transitions are symmetric


def grad_transition(kind: str, D_next: Tensor, S_start: Tensor) -> Tensor | None:
    """Gradient of ``<D_next, A S_start>`` with respect to ``A`` (shaped like ``A``)."""
    if kind == "identity":
        return None
    if kind == "scalar":
        return (D_next * S_start).sum(dim=(-1, -2))
    if kind == "diagonal":
        return (D_next * S_start).sum(dim=-1)
    return D_next @ S_start.transpose(-1, -2)


def compose(kind: str, A2: Tensor | None, B2: Tensor, A1: Tensor | None, B1: Tensor):
    """``(A2, B2) ∘ (A1, B1) = (A2 A1, A2 B1 + B2)``: first pair 1, then pair 2."""
    if kind == "identity":
        A = None
    elif kind == "full":
        A = A2 @ A1
    else:
        A = A2 * A1
    return A, apply(kind, A2, B1) + B2


@dataclass
class LocalPass:
    """What a rank computes from its own slice, before and without any communication.

    ``pair()`` gives ``(A, B)`` as early as possible; ``outputs()`` the zero-start outputs ``o0``
    ``[B, T, H, V]`` and effective queries ``qe`` ``[B, T, H, K]``. Between the two calls the
    exchange of the pair can run (see ``lsp.parallel.sequence`` for the overlap plan).
    """

    kind: str
    pair: Callable[[], tuple[Tensor | None, Tensor]]
    outputs: Callable[[], tuple[Tensor, Tensor]]


def local_pass(spec: OpSpec, call: OpCall) -> LocalPass:
    """This rank's :class:`LocalPass` for a validated call of its op."""
    if spec.family == Family.DELTA_RULE:
        return delta_rule_local(spec, call)
    return linear_attention_local(spec, call)


def _cumulative_log_decay(g: Tensor) -> Tensor:
    # float64 cumsum: over a long slice the float32 sum would lose the small late terms;
    # clamp_full_forget: a gate of -inf (full forget) gives exact zeros, not -inf - -inf = NaN
    return clamp_full_forget(g.double()).cumsum(dim=1)


def linear_attention_local(spec: OpSpec, call: OpCall) -> LocalPass:
    """Closed-form pair and effective queries of additive linear attention over this slice.

    ``G_t = sum_{s<=t} g_s`` (inclusive, from the slice start); the decay between tokens is
    ``exp(G_t - G_s)``, which never exceeds 1 for ``g <= 0``.
    """
    q, k, v, g, scale = call.q, call.k, call.v, call.g, call.scale
    kind = call.transition
    ct = call.state_dtype

    def pair():
        kf, vf = k.to(ct), v.to(ct)
        if g is None:
            A = None
            kd = kf
        else:
            G = _cumulative_log_decay(g)  # [B,T,H] or [B,T,H,K]
            G_end = G[:, -1:]
            A = G[:, -1].to(ct).exp()  # [B,H] or [B,H,K]
            w = (G_end - G).to(ct).exp()
            kd = kf * (w.unsqueeze(-1) if kind == "scalar" else w)
        B = torch.einsum("bthk,bthv->bhkv", kd, vf)
        return A, B

    def outputs():
        o0, _ = spec.run(call.replace(initial_state=None, output_final_state=False))
        qf = q.to(ct) * scale
        if g is None:
            qe = qf
        else:
            w = _cumulative_log_decay(g).to(ct).exp()
            qe = qf * (w.unsqueeze(-1) if kind == "scalar" else w)
        return o0, qe

    return LocalPass(kind, pair, outputs)


def delta_rule_local(spec: OpSpec, call: OpCall) -> LocalPass:
    """Pair and effective queries of the delta rules from one chunkwise pass.

    Runs ``op`` once with values ``[v | 0_K]`` and initial state ``[0 | I_K]``: the output's last
    ``K`` columns are ``qe`` (scale included), the final state's are ``A`` ``[B, H, K, K]``.
    """
    q, v = call.q, call.v
    B_, T, H, K = q.shape
    V = v.shape[-1]
    state_dtype = call.state_dtype
    cache: dict = {}

    def run():
        if not cache:
            v_aug = torch.cat([v, v.new_zeros(B_, T, H, K)], dim=-1)
            eye = torch.eye(K, dtype=state_dtype, device=q.device).expand(B_, H, K, K)
            s0 = torch.cat([eye.new_zeros(B_, H, K, V), eye], dim=-1)
            o_aug, s_aug = spec.run(call.replace(v=v_aug, initial_state=s0,
                                                 output_final_state=True))
            cache.update(o0=o_aug[..., :V], qe=o_aug[..., V:], B=s_aug[..., :V],
                         A=s_aug[..., V:])
        return cache

    def pair():
        c = run()
        return c["A"], c["B"]

    def outputs():
        c = run()
        return c["o0"], c["qe"]

    return LocalPass(Transition.FULL, pair, outputs)
