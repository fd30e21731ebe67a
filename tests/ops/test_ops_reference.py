"""The torch path of both ops against the float64 per-token recurrence (the oracle)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lsp
from lsp.ops.common.chunk import chunk_recurrence
from lsp.testing import (
    FAMILIES,
    GATES,
    call,
    make_inputs,
    naive_for,
    outputs_and_grads,
    rel_err,
    upcast,
)

OPS = {"linear_attention": lsp.ops.linear_attention, "delta_rule": lsp.ops.delta_rule}
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def assert_matches_oracle(family, args, tol, **kw):
    """Outputs, final state and every input gradient of the torch path vs the float64 oracle."""
    o, S, grads = outputs_and_grads(OPS[family], args, backend="torch", **kw)
    ref_args = upcast(args)
    o_ref, S_ref, grads_ref = outputs_and_grads(naive_for(family), ref_args, **kw)
    assert o.dtype == args["v"].dtype
    assert S.dtype == (torch.float64 if args["q"].dtype == torch.float64 else torch.float32)
    errs = {"o": rel_err(o, o_ref), "S": rel_err(S, S_ref)}
    errs.update({f"d{n}": rel_err(grads[n], grads_ref[n]) for n in grads})
    bad = {n: e for n, e in errs.items() if not e <= tol}  # `not <=` also catches NaN
    assert not bad, f"relative errors above {tol}: {bad}"
    return errs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "init_state"])
@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_naive_oracle(family, gate, T, with_state, dtype):
    # K != V, two heads, batch of two; T=130 spans three 64-token chunks with a ragged tail.
    args = make_inputs(family, gate, B=2, T=T, H=2, K=16, V=24, dtype=dtype,
                       with_state=with_state, seed=T)
    assert_matches_oracle(family, args, TOL[dtype])


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 128])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_any_chunk_size(family, gate, chunk_size):
    """The chunkwise form is exact for every chunk size, including 1 and one larger than T."""
    args = make_inputs(family, gate, B=1, T=45, H=2, K=8, V=12, seed=7)
    beta = args.get("beta")
    o, S = chunk_recurrence(args["q"], args["k"], args["v"], args.get("g"), beta, 8**-0.5,
                            args["initial_state"], True, chunk_size=chunk_size)
    o_ref, S_ref = call(naive_for(family), args, output_final_state=True)
    assert rel_err(o, o_ref) <= 1e-12 and rel_err(S, S_ref) <= 1e-12


@pytest.mark.parametrize("gate_value", [0.0, -30.0, -1000.0], ids=["no_decay", "g=-30", "g=-1000"])
@pytest.mark.parametrize("gate", ["head", "key"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_extreme_gates(family, gate, gate_value, dtype):
    """Gates of exactly 0 and very negative gates (on every other token, ordinary gates on the
    rest, so the test sees both regimes): finite, exact outputs and gradients."""
    args = make_inputs(family, gate, B=1, T=70, H=2, K=8, V=8, dtype=dtype, seed=3,
                       gate_value=gate_value)
    assert_matches_oracle(family, args, TOL[dtype])


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_chaining_two_halves(family, gate):
    """T tokens at once == first part, then second part started from the first's final state."""
    T, split = 101, 37
    args = make_inputs(family, gate, B=2, T=T, H=2, K=8, V=16, seed=11)
    op = OPS[family]
    o_full, S_full, g_full = outputs_and_grads(op, args, backend="torch")

    leaves = upcast(args)  # fresh leaves with the same values
    first = {n: t[:, :split] for n, t in leaves.items() if n != "initial_state"}
    second = {n: t[:, split:] for n, t in leaves.items() if n != "initial_state"}
    o1, S1 = call(op, {**first, "initial_state": leaves["initial_state"]},
                  output_final_state=True, backend="torch")
    o2, S2 = call(op, {**second, "initial_state": S1}, output_final_state=True, backend="torch")
    o_cat = torch.cat([o1, o2], dim=1)
    assert rel_err(o_cat, o_full) <= 1e-12 and rel_err(S2, S_full) <= 1e-12

    gen = torch.Generator().manual_seed(1)  # the same cotangents as outputs_and_grads draws
    do = torch.randn(o_cat.shape, generator=gen, dtype=torch.float64)
    dS = torch.randn(S2.shape, generator=gen, dtype=torch.float64)
    loss = (o_cat * do).sum() + (S2 * dS).sum()
    names = list(leaves)
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))
    for n in names:
        assert rel_err(grads[n], g_full[n]) <= 1e-12, n


@settings(max_examples=25, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    gate=st.sampled_from(GATES),
    B=st.integers(1, 2),
    T=st.integers(1, 90),
    H=st.integers(1, 3),
    K=st.integers(1, 12),
    V=st.integers(1, 12),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_oracle(family, gate, B, T, H, K, V, with_state, seed):
    args = make_inputs(family, gate, B=B, T=T, H=H, K=K, V=V, with_state=with_state, seed=seed)
    assert_matches_oracle(family, args, 1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_explicit_scale(family):
    args = make_inputs(family, "head", B=1, T=20, H=1, K=4, V=4, seed=5)
    assert_matches_oracle(family, args, 1e-9, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_inputs_keep_fp32_state(family, dtype):
    """bf16/fp16 inputs: output in the input dtype, state in float32, close to the oracle."""
    args = make_inputs(family, "key", B=1, T=40, H=2, K=8, V=8, dtype=dtype, seed=2)
    o, S = call(OPS[family], args, output_final_state=True, backend="torch")
    assert o.dtype == dtype and S.dtype == torch.float32
    o_ref, S_ref = call(naive_for(family), upcast(args), output_final_state=True)
    assert rel_err(o, o_ref) <= 1e-2 and rel_err(S, S_ref) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_no_final_state_unless_asked(family):
    args = make_inputs(family, "none", B=1, T=5, H=1, K=4, V=4)
    o, S = call(OPS[family], args)
    assert S is None and o.shape == (1, 5, 1, 4)
