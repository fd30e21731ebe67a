"""The delta-rule transition and effective queries (chunk transition algebra) against the oracle.

``lsp.ops.delta_net.fixup.delta_rule_transition`` gives ``(P_N, qe)`` of a stretch. The reference
is independent: the float64 per-token recurrence run from the identity state with zero values,
whose final state is the transition and whose outputs are the effective queries. Values, and
the gradients of ``q, k, beta, g`` through both, for every gate kind, lengths that are not a
multiple of the chunk, two chunk sizes, default and tiny groups (many checkpointed groups, scan
blocks and Hillis–Steele levels), and gates of 0 and down to -1000 per token.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lsp.ops.delta_net.fixup import delta_rule_transition
from lsp.ops.delta_net.naive import naive_recurrent_delta_rule
from lsp.testing import rel_err

B, H, K = 2, 2, 6
SCALE = 0.37
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def _gate(kind: str, regime: str, T: int, gen: torch.Generator):
    if kind == "none":
        return None
    shape = (B, T, H) if kind == "head" else (B, T, H, K)
    if regime == "zero":
        return torch.zeros(shape, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64))
    if regime == "strong":
        # -30..-70 on about a third of the entries, -1000 on a few; the rest ordinary
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        g = torch.where(u < 0.35, -30 - 40 * torch.rand(shape, generator=gen, dtype=torch.float64), g)
        g = torch.where(u > 0.97, torch.full_like(g, -1000.0), g)
    return g


def _inputs(kind: str, regime: str, T: int, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    a = {
        "q": torch.randn(B, T, H, K, generator=gen, dtype=torch.float64),
        "k": F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1),
        "beta": torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)),
    }
    g = _gate(kind, regime, T, gen)
    if g is not None:
        a["g"] = g
    return {n: t.to(dtype).requires_grad_() for n, t in a.items()}


def _oracle(a: dict):
    """``(P_N, qe)`` from the float64 per-token recurrence: state I, values 0."""
    x = {n: t.detach().double().requires_grad_() for n, t in a.items()}
    Bsz, T, Hh, Kk = x["q"].shape
    eye = torch.eye(Kk, dtype=torch.float64).expand(Bsz, Hh, Kk, Kk)
    qe, P = naive_recurrent_delta_rule(
        x["q"], x["k"], x["q"].new_zeros(Bsz, T, Hh, Kk), x["beta"], x.get("g"), scale=SCALE,
        initial_state=eye, output_final_state=True)
    return x, P, qe


def _cotangents(T: int):
    gen = torch.Generator().manual_seed(99)
    return (torch.randn(B, H, K, K, generator=gen, dtype=torch.float64),
            torch.randn(B, T, H, K, generator=gen, dtype=torch.float64))


def _err_at_identity_scale(P: torch.Tensor, P_ref: torch.Tensor) -> float:
    """``‖P − P_ref‖ / max(‖P_ref‖, 1e-3 ‖I‖)``: float32 holds a product of contractions only to
    ~1e-7 of the identity's scale, so once the stretch has contracted (or underflowed) below
    1e-3 of it, any float32 method (the old V + K state pass too) loses relative accuracy."""
    unit = 1e-3 * (B * H * K) ** 0.5
    return (P.detach().double() - P_ref.detach()).norm().item() / max(P_ref.norm().item(), unit)


CASES = [
    (kind, regime, T, C, grouping, dtype)
    for kind, T, C, grouping, dtype in itertools.product(
        ("none", "head", "key"), (1, 37, 130), (64, 16), ("default", "tiny"),
        (torch.float64, torch.float32))
    for regime in (("normal",) if kind == "none" else ("normal", "zero", "strong"))
    if not (grouping == "tiny" and C == 64)  # at C = 64 these T give at most 3 chunks
]


@pytest.mark.parametrize("kind,regime,T,C,grouping,dtype", CASES,
                         ids=[f"{k}-{r}-T{t}-C{c}-{gr}-{str(d)[6:]}" for k, r, t, c, gr, d in CASES])
def test_transition_matches_oracle(kind, regime, T, C, grouping, dtype):
    a = _inputs(kind, regime, T, dtype)
    kw = {"block_chunks": 2, "group_bytes": 1} if grouping == "tiny" else {}
    P, qe = delta_rule_transition(a["q"], a["k"], a["beta"], a.get("g"), scale=SCALE,
                                  chunk_size=C, **kw)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    assert P.dtype == ct and qe.dtype == ct
    assert P.shape == (B, H, K, K) and qe.shape == (B, T, H, K)
    x, P_ref, qe_ref = _oracle(a)
    tol = TOL[dtype]
    assert rel_err(P, P_ref) <= tol or (
        dtype == torch.float32 and _err_at_identity_scale(P, P_ref) <= tol), rel_err(P, P_ref)
    assert rel_err(qe, qe_ref) <= tol, rel_err(qe, qe_ref)

    dP, dqe = _cotangents(T)
    names = list(a)
    grads = torch.autograd.grad((P * dP.to(ct)).sum() + (qe * dqe.to(ct)).sum(),
                                [a[n] for n in names])
    refs = torch.autograd.grad((P_ref * dP).sum() + (qe_ref * dqe).sum(), [x[n] for n in names])
    for n, gr, ref in zip(names, grads, refs):
        assert torch.isfinite(gr).all(), n
        assert rel_err(gr, ref) <= tol, (n, rel_err(gr, ref))


@pytest.mark.parametrize("kind", ["head", "key"])
def test_gates_of_minus_1000_everywhere(kind):
    """Every decay is exp(-1000) = 0 in float64: the transition and qe vanish, gradients finite."""
    a = _inputs(kind, "normal", 70, torch.float64)
    a["g"] = torch.full_like(a["g"], -1000.0).requires_grad_()
    P, qe = delta_rule_transition(a["q"], a["k"], a["beta"], a["g"], scale=SCALE, chunk_size=16)
    assert P.abs().max().item() == 0.0 and qe.abs().max().item() == 0.0
    dP, dqe = _cotangents(70)
    grads = torch.autograd.grad((P * dP).sum() + (qe * dqe).sum(), list(a.values()))
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_long_stretch_many_levels():
    """T = 1000 at C = 8 (125 chunks: blocks of 11, a 4-level scan), float64, scalar gates."""
    a = _inputs("head", "normal", 1000, torch.float64, seed=3)
    # weak decay and writes, so that P_N stays well above 0 over 1000 tokens
    a["g"] = (a["g"].detach() * 0.002).requires_grad_()
    a["beta"] = (a["beta"].detach() * 0.05).requires_grad_()
    P, qe = delta_rule_transition(a["q"], a["k"], a["beta"], a["g"], scale=SCALE, chunk_size=8)
    _, P_ref, qe_ref = _oracle(a)
    assert P_ref.norm() > 1e-3
    assert rel_err(P, P_ref) <= 1e-9 and rel_err(qe, qe_ref) <= 1e-9


@pytest.mark.parametrize("name,value", [("chunk_size", 0), ("chunk_size", 8.0),
                                        ("block_chunks", 0), ("group_bytes", -1)])
def test_bad_sizes_raise(name, value):
    a = _inputs("none", "normal", 5, torch.float64)
    with pytest.raises(ValueError, match=name):
        delta_rule_transition(a["q"], a["k"], a["beta"], None, scale=SCALE, **{name: value})


@pytest.mark.parametrize("kind", ["none", "head", "key"])
def test_without_recompute_matches_oracle(kind):
    """``recompute=False`` (no checkpointing) gives the same values and gradients."""
    a = _inputs(kind, "normal", 45, torch.float64, seed=4)
    P, qe = delta_rule_transition(a["q"], a["k"], a["beta"], a.get("g"), scale=SCALE,
                                  chunk_size=8, group_bytes=1, recompute=False)
    x, P_ref, qe_ref = _oracle(a)
    dP, dqe = _cotangents(45)
    names = list(a)
    grads = torch.autograd.grad((P * dP).sum() + (qe * dqe).sum(), [a[n] for n in names])
    refs = torch.autograd.grad((P_ref * dP).sum() + (qe_ref * dqe).sum(), [x[n] for n in names])
    assert rel_err(P, P_ref) <= 1e-9 and rel_err(qe, qe_ref) <= 1e-9
    for n, gr, ref in zip(names, grads, refs):
        assert rel_err(gr, ref) <= 1e-9, n
