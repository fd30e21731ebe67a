"""Softmax attention under CP (K/V all-gathered over the CP group, LASP-2H) equals unsharded
causal attention, outputs and gradients, with grouped-query heads; rotary positions are global."""

from __future__ import annotations

import pytest
import torch

from lsp.layers.attention import apply_rope, causal_attention
from lsp.parallel.topology import init_topology
from lsp.testing import rel_err, run_ranks

B, T, HQ, HKV, D = 2, 12, 4, 2, 8


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, HQ, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, HKV, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, HKV, D, generator=gen, dtype=torch.float64)
    do = torch.randn(B, T, HQ, D, generator=gen, dtype=torch.float64)
    return q, k, v, do


def _unsharded():
    """Plain causal attention over the whole sequence: explicit softmax of masked scores."""
    q, k, v, do = (t.clone().requires_grad_() for t in _inputs())
    pos = torch.arange(T)
    qr, kr = apply_rope(q, pos), apply_rope(k, pos)
    kr, vr = kr.repeat_interleave(HQ // HKV, 2), v.repeat_interleave(HQ // HKV, 2)
    s = torch.einsum("bthd,bshd->bhts", qr, kr) / D ** 0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), vr)
    (o * do.detach()).sum().backward()
    return o.detach(), q.grad, k.grad, v.grad


def _rank(rank, world, balance=False, dtype=torch.float64, overlap=False):
    topo = init_topology(cp=world)
    t = T // world
    sl = slice(rank * t, (rank + 1) * t)
    q, k, v, do = (x[:, sl].to(dtype).requires_grad_() for x in _inputs())
    pos = rank * t + torch.arange(t)
    o = causal_attention(apply_rope(q, pos), apply_rope(k, pos), v, topo.cp_group, balance,
                         overlap)
    (o * do.detach()).sum().backward()
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("world", [2, 3])
def test_softmax_attention_under_cp_equals_unsharded_causal_attention(world):
    ref = _unsharded()
    one = causal_attention(apply_rope(_inputs()[0], torch.arange(T)),
                           apply_rope(_inputs()[1], torch.arange(T)), _inputs()[2])
    assert torch.allclose(one, ref[0], rtol=0, atol=1e-12)  # SDPA path at CP 1
    out = run_ranks(_rank, world)
    for i, name in enumerate(["o", "dq", "dk", "dv"]):
        got = torch.cat([o[i] for o in out], dim=1)
        assert torch.allclose(got, ref[i], rtol=0, atol=1e-12), name


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_balanced_attention_under_cp_equals_unsharded_causal_attention(world, overlap):
    # the busier rank of each pair (r, P-1-r) hands query rows to its partner: outputs and
    # every gradient still equal plain causal attention over the whole sequence (float64),
    # whether the exchange runs after each rank's own blocks or alongside them
    ref = _unsharded()
    out = run_ranks(_rank, world, True, torch.float64, overlap)
    for i, name in enumerate(["o", "dq", "dk", "dv"]):
        got = torch.cat([o[i] for o in out], dim=1)
        assert torch.allclose(got, ref[i], rtol=0, atol=1e-10), name


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_balanced_attention_in_bfloat16(overlap):
    # bf16 inputs with float32 log-sum-exp crossing between the partners (a buffer of the
    # wrong dtype on either side breaks the exchange); bf16 rounding against float64
    ref = _unsharded()
    out = run_ranks(_rank, 2, True, torch.bfloat16, overlap)
    for i, name in enumerate(["o", "dq", "dk", "dv"]):
        got = torch.cat([o[i] for o in out], dim=1)
        assert rel_err(got, ref[i]) < 2e-2, name


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_balanced_attention_evens_out_the_work(P):
    from lsp.parallel.cp_attention import rank_work

    T = 4096
    plain = [r + 0.5 for r in range(P)]  # contiguous layout, each rank its own queries
    work = [rank_work(P, T, r) for r in range(P)]
    assert abs(sum(work) - sum(plain)) < 1e-9  # the same scores, moved between ranks
    assert max(work) - min(work) <= 1.0 / T * P  # within a row of P / 2 each
    assert max(plain) / min(plain) == 2 * P - 1


def test_rope_is_a_rotation_by_relative_position():
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    a = (apply_rope(q, torch.tensor([7])) * apply_rope(k, torch.tensor([3]))).sum()
    b = (apply_rope(q, torch.tensor([104])) * apply_rope(k, torch.tensor([100]))).sum()
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.allclose(apply_rope(q, torch.tensor([5])).norm(), q.norm())
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(torch.zeros(1, 1, 1, 3), torch.tensor([0]))


def test_overlap_without_balance_is_refused():
    from lsp.layers.context import ParallelContext

    with pytest.raises(ValueError, match="needs attention_load_balance=True"):
        ParallelContext(attention_balance_overlap=True)
