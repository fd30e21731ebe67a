"""Packed documents (``cu_seqlens``) in the public ops against the per-document float64 oracle.

The oracle (``naive_recurrent_*`` with ``cu_seqlens``) runs every document separately from its
own initial state, token by token; the torch chunk path must match it in outputs, per-document
final states and every gradient, per-document initial states included, with documents that
straddle chunks, end inside a chunk, or hold a single token.
"""

from __future__ import annotations

import re

import pytest
import torch
from lsp.testing import FAMILIES, GATES, call, make_inputs, naive_for, rel_err, upcast

import lsp

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}  # as tests/ops/test_ops_reference.py

H, K, V = 2, 6, 5
# documents crossing the 64-token chunk edge, ending inside a chunk, one-token ones, a long one
LAYOUTS = {
    "mixed": [0, 1, 40, 41, 42, 130, 150],
    "tiny": list(range(0, 24)) + [40],
    "one": [0, 70],
}
OPS = {"linear_attention": lsp.ops.linear_attention, "delta_rule": lsp.ops.delta_rule}


def packed_case(family, gate, dtype, offsets, with_state=True, seed=0):
    T, N = offsets[-1], len(offsets) - 1
    a = make_inputs(family, gate, 1, T, H, K, V, dtype=dtype, with_state=False, seed=seed)
    if with_state:
        gen = torch.Generator().manual_seed(seed + 7)
        a["initial_state"] = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64).to(
            dtype).requires_grad_()
    return a


# many tiny documents in float64 only (the layout, not the dtype, is the point there)
CASES = [("mixed", torch.float64), ("mixed", torch.float32), ("tiny", torch.float64),
         ("one", torch.float64), ("one", torch.float32)]


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout,dtype", CASES,
                         ids=[f"{n}-{str(d)[-7:]}" for n, d in CASES])
def test_packed_matches_per_document_oracle(family, gate, dtype, layout):
    offsets = LAYOUTS[layout]
    cu = torch.tensor(offsets, dtype=torch.int32 if layout == "mixed" else torch.int64)
    a = packed_case(family, gate, dtype, offsets)
    o, S = call(OPS[family], a, output_final_state=True, backend="torch", cu_seqlens=cu)
    assert o.shape == (1, offsets[-1], H, V) and S.shape == (len(offsets) - 1, H, K, V)
    ref = upcast(a)
    o_ref, S_ref = call(naive_for(family), ref, output_final_state=True, cu_seqlens=cu)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    dS = torch.randn(S_ref.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((o * do.to(o.dtype)).sum() + (S * dS.to(S.dtype)).sum(),
                                list(a.values()))
    ref_grads = torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(), list(ref.values()))
    tol = TOL[dtype] * 10
    assert rel_err(o, o_ref) < tol
    assert rel_err(S, S_ref) < tol
    for name, gr, gref in zip(a, grads, ref_grads):
        assert rel_err(gr, gref) < tol, name


def test_packed_is_not_the_unpacked_run():
    """The oracle itself resets: the packed result differs from one long document's."""
    offsets = LAYOUTS["mixed"]
    a = packed_case("delta_rule", "head", torch.float64, offsets, with_state=False)
    o_doc, _ = call(lsp.ops.delta_rule, a, backend="torch",
                    cu_seqlens=torch.tensor(offsets))
    o_one, _ = call(lsp.ops.delta_rule, a, backend="torch")
    first = slice(0, offsets[2])  # the first two documents: one token, then 39
    assert rel_err(o_doc[:, :1], o_one[:, :1]) < 1e-12  # the first token has no past
    assert rel_err(o_doc[:, first], o_one[:, first]) > 1e-3


def test_packed_without_initial_state_starts_from_zero():
    offsets = [0, 5, 9]
    a = packed_case("linear_attention", "key", torch.float64, offsets, with_state=False)
    cu = torch.tensor(offsets)
    o, S = call(lsp.ops.linear_attention, a, output_final_state=True, backend="torch",
                cu_seqlens=cu)
    for n in range(2):
        sl = slice(offsets[n], offsets[n + 1])
        o_n, S_n = lsp.ops.linear_attention(a["q"][:, sl], a["k"][:, sl], a["v"][:, sl],
                                            a["g"][:, sl], output_final_state=True,
                                            backend="torch")
        assert rel_err(o[:, sl], o_n) < 1e-12 and rel_err(S[n], S_n[0]) < 1e-12


T = 9


def _args(B=1):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    return q, k, torch.randn(B, T, H, V, generator=gen), torch.rand(B, T, H, generator=gen)


BAD = [
    (dict(cu_seqlens=torch.tensor([1, 4, 9])), r"cu_seqlens starts at 1; the first offset must be 0"),
    (dict(cu_seqlens=torch.tensor([0, 4, 8])), r"cu_seqlens ends at 8 but the sequence has T=9"),
    (dict(cu_seqlens=torch.tensor([0, 4, 4, 9])), r"not strictly increasing: cu_seqlens\[1\]=4 and cu_seqlens\[2\]=4"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 9])), r"not strictly increasing"),
    (dict(cu_seqlens=torch.tensor([0.0, 9.0])), r"cu_seqlens has dtype torch\.float32; .*int32 or int64"),
    (dict(cu_seqlens=[0, 9]), r"cu_seqlens must be an int32 or int64 tensor"),
    (dict(cu_seqlens=torch.tensor([[0, 9]])), r"cu_seqlens has shape \[1, 2\]; it must be 1-D"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9]), initial_state=torch.zeros(1, H, K, V)),
     r"initial_state has shape \[1, 2, 6, 5\]; with cu_seqlens of 2 documents .*\[2, 2, 6, 5\]"),
    # the kernels take offsets, but only on CUDA tensors (or the interpreter, see
    # tests/kernels/test_kernels_interpreter.py): refused at bind time, before any collective
    (dict(cu_seqlens=torch.tensor([0, 4, 9]), backend="triton"),
     r"backend='triton' needs CUDA tensors"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kw,pattern", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_offsets_raise_named_errors(family, kw, pattern):
    q, k, v, beta = _args()
    extra = (beta,) if family == "delta_rule" else ()
    with pytest.raises(ValueError, match=pattern) as e:
        OPS[family](q, k, v, *extra, **kw)
    assert str(e.value).startswith(family)


def test_batch_of_two_with_offsets_raises():
    q, k, v, _ = _args(B=2)
    with pytest.raises(ValueError, match=re.escape("cu_seqlens needs a batch of 1")):
        lsp.ops.linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 9]))
