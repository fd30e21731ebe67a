"""The Triton kernels (``lsp.kernels``) under Triton's CPU interpreter, against the float64 oracle.

Every family and gate kind, forward and backward (outputs, final state and the gradient of every
input, the initial state included, with a gradient on the final state), at tiny shapes: ragged T,
K != V, several chunk sizes and in-GPU sequence segments (the affine scan), float32 and float16;
packed documents (``cu_seqlens``) against the oracle run per document.
The interpreter cannot compute bfloat16 dot products (see ``lsp.kernels._check``); bfloat16 is
checked on the GPU by ``launch/bench_kernels.py``.

``TRITON_INTERPRET=1`` must be set when the kernels are decorated and while they run: this module
sets it to import the kernel modules and restores it, and a fixture sets it again during each of
its tests only, so the rest of the suite is unaffected.
"""

from __future__ import annotations

from triton_env import interpreted

with interpreted():
    import lsp.kernels.common.chunk  # noqa: F401  (decorates every kernel for the interpreter)
    from lsp.kernels.common import utils as kutils

import pytest  # noqa: E402
import torch  # noqa: E402

import lsp  # noqa: E402
from lsp import kernels  # noqa: E402
from lsp.testing import (  # noqa: E402
    FAMILIES,
    GATES,
    call,
    make_inputs,
    naive_for,
    op_args,
    outputs_and_grads,
    rel_err,
    upcast,
)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


KERNEL_OPS = {"linear_attention": kernels.linear_attention, "delta_rule": kernels.delta_rule}
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


def test_kernels_were_built_for_the_interpreter():
    # fails loudly if another module imported lsp.kernels' kernels before TRITON_INTERPRET was set
    assert kutils.interpreted()
    assert kernels.unavailable_reason() is None and kernels.available()


def check(family, args, tol, *, with_final=True, **kw):
    """Kernel outputs and gradients vs the float64 per-token oracle; returns the errors."""
    fn = KERNEL_OPS[family]
    if with_final:
        o, S, grads = outputs_and_grads(fn, args, **kw)
        o_ref, S_ref, grads_ref = outputs_and_grads(naive_for(family), upcast(args))
        assert S.dtype == torch.float32 and S.shape == S_ref.shape
        errs = {"o": rel_err(o, o_ref), "S": rel_err(S, S_ref)}
    else:
        # no final state: the op returns None for it and the loss sees only the outputs
        o, S = call(fn, args, **kw)
        assert S is None
        gen = torch.Generator().manual_seed(5)
        do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        grads = dict(zip(args, torch.autograd.grad((o * do.to(o.dtype)).sum(), list(args.values()))))
        ref = upcast(args)
        o_ref, _ = call(naive_for(family), ref)
        grads_ref = dict(zip(ref, torch.autograd.grad((o_ref * do).sum(), list(ref.values()))))
        errs = {"o": rel_err(o, o_ref)}
    assert o.dtype == args["v"].dtype and o.shape == o_ref.shape
    for n, gr in grads.items():
        assert gr.dtype == args[n].dtype and gr.shape == args[n].shape, n
    errs.update({f"d{n}": rel_err(grads[n], grads_ref[n]) for n in grads})
    bad = {n: e for n, e in errs.items() if not e <= tol}  # `not <=` also catches NaN
    assert not bad, f"relative errors above {tol}: {bad}"
    return errs


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_oracle(family, gate):
    # two 64-token chunks with a ragged tail, K != V, batch and heads > 1, an initial state
    args = make_inputs(family, gate, B=2, T=70, H=2, K=32, V=16, dtype=torch.float32, seed=1)
    check(family, args, TOL[torch.float32])


# (chunk size, segments): many chunks per sequence, split into 2, 3 or 5 segments, so the pair
# pass, the scan (forward and reverse) and the per-segment passes all run
SPLITS = {"none": (16, 3), "head": (16, 5), "key": (32, 2)}


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_segments(family, gate):
    chunk, segs = SPLITS[gate]
    args = make_inputs(family, gate, B=1, T=69, H=2, K=16, V=32, dtype=torch.float32, seed=2)
    check(family, args, TOL[torch.float32], chunk_size=chunk, num_segments=segs)


@pytest.mark.parametrize("family", FAMILIES)
def test_segments_do_not_change_the_result(family):
    """Same inputs, 1 vs 4 segments: equal to float32 rounding (the scan is exact algebra)."""
    args = make_inputs(family, "head", B=1, T=64, H=1, K=16, V=16, dtype=torch.float32, seed=4)
    fn = KERNEL_OPS[family]
    o1, S1, g1 = outputs_and_grads(fn, args, chunk_size=16, num_segments=1)
    o4, S4, g4 = outputs_and_grads(fn, args, chunk_size=16, num_segments=4)
    assert rel_err(o4, o1) < 1e-5 and rel_err(S4, S1) < 1e-5
    assert all(rel_err(g4[n], g1[n]) < 1e-5 for n in g1)


@pytest.mark.parametrize("gate", ["head", "key"])
@pytest.mark.parametrize("family", FAMILIES)
def test_float16(family, gate):
    args = make_inputs(family, gate, B=1, T=45, H=2, K=16, V=32, dtype=torch.float16, seed=3)
    check(family, args, TOL[torch.float16], chunk_size=16, num_segments=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_state_in_or_out(family):
    args = make_inputs(family, "head", B=1, T=33, H=2, K=16, V=16, dtype=torch.float32,
                       with_state=False, seed=6)
    check(family, args, TOL[torch.float32], with_final=False, chunk_size=16)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_token_and_wide_values(family):
    """T = 1; V wider than one state block (two value blocks, the second ragged), K not 2^n."""
    args = make_inputs(family, "none", B=1, T=1, H=1, K=16, V=16, dtype=torch.float32, seed=7)
    check(family, args, TOL[torch.float32])
    args = make_inputs(family, "key", B=1, T=20, H=1, K=24, V=80, dtype=torch.float32, seed=8)
    check(family, args, TOL[torch.float32], chunk_size=16, num_segments=2)


@pytest.mark.parametrize("value", [0.0, -1000.0], ids=["no_decay", "g=-1000"])
@pytest.mark.parametrize("gate", ["head", "key"])
@pytest.mark.parametrize("family", FAMILIES)
def test_extreme_gates(family, gate, value):
    """Gates of 0 and of -1000 (every other token): finite, and close to the oracle. With
    g=-1000 the cumulative gate reaches -3e4 inside a chunk, where float32 keeps differences of
    neighbouring tokens to only ~1e-3 absolute (the torch path keeps it in float64; the kernels, like fla, in float32),
    hence the looser bound there."""
    args = make_inputs(family, gate, B=1, T=40, H=1, K=16, V=16, dtype=torch.float32, seed=9,
                       gate_value=value)
    check(family, args, 2e-5 if value == 0 else 1e-3, chunk_size=32, num_segments=1)


@pytest.mark.parametrize("gate", GATES)
def test_delta_backward_in_key_blocks(gate, monkeypatch):
    """The key-blocked WY backward (used for K > 128 on the GPU), forced here at K = 24 in blocks
    of 16 (two blocks, the second ragged)."""
    from lsp.kernels.delta_net import stages as kstages

    monkeypatch.setattr(kstages, "WY_SINGLE_TILE_MAX_K", 16)
    monkeypatch.setattr(kstages, "WY_BLOCK_K", 16)
    args = make_inputs("delta_rule", gate, B=1, T=40, H=2, K=24, V=16, dtype=torch.float32, seed=12)
    check("delta_rule", args, TOL[torch.float32], chunk_size=16, num_segments=2)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "separate"])
def test_per_channel_delta_rule_pairwise_products_fused_or_separate(fuse, monkeypatch):
    """KDA-like's two pairwise products (Aqk, Akk) and their gradients in one pass each, or in
    two: both against the oracle, with packed documents and segments (ragged sub-chunks)."""
    from lsp.kernels.common import chunk as kchunk

    monkeypatch.setattr(kchunk, "FUSE_PAIRWISE", fuse)
    args = make_inputs("delta_rule", "key", B=2, T=75, H=2, K=24, V=16, dtype=torch.float32,
                       seed=21)
    check("delta_rule", args, TOL[torch.float32], chunk_size=32, num_segments=2)


@pytest.mark.parametrize("T", [128, 320])
@pytest.mark.parametrize("gate", ["head", "key"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gate_gradient_under_very_negative_log_gates(family, gate, T):
    """Log-gates of -30 to -70 per token (fla's test rows with normaliser 0.01): the true gate
    gradient is ~1e-13. The chunk form gets it as a difference of O(1) terms (``q dq - k dk``
    summed within the chunk), so float32 leaves an absolute error of about eps times those terms
    (~3e-7 for the per-channel gate; the scalar gate's terms underflow to ~0 instead); the
    per-token recurrence has none (it multiplies by exp(g)). The bound: 4 eps times the largest
    ``|q dq| + |k dk|`` (summed over keys for the scalar gate), at T = 128 and 320 alike: the
    error is cancellation inside a chunk and does not grow with the sequence or the decay."""
    def gate_fn(shape, gen):
        return -(30 + 40 * torch.rand(*shape, generator=gen, dtype=torch.float64))

    args = make_inputs(family, gate, B=1, T=T, H=1, K=32, V=16, dtype=torch.float32, seed=3,
                       gate_fn=gate_fn, with_state=False)
    _, _, got = outputs_and_grads(KERNEL_OPS[family], args, chunk_size=64)
    ref_args = upcast(args)
    _, _, ref = outputs_and_grads(naive_for(family), ref_args)
    terms = (ref_args["q"] * ref["q"]).abs() + (ref_args["k"] * ref["k"]).abs()
    scale = float(terms.sum(-1).max() if gate == "head" else terms.max())
    err = float((got["g"].double() - ref["g"]).abs().max())
    assert float(ref["g"].abs().max()) < 1e-12  # the regime: a vanishing true gradient
    assert err <= 4 * torch.finfo(torch.float32).eps * scale, (err, scale)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_in_key_blocks(family, gate, monkeypatch):
    """The per-chunk gradient kernel in blocks of key columns (64 on the GPU), forced here at
    K = 40 in blocks of 16 (three blocks, the last ragged): the scalar gate's per-block parts
    summed, linear attention's final gate gradient from them, the per-channel products' dA
    written once."""
    monkeypatch.setattr(kutils, "GRAD_KEY_BLOCK", 16)
    monkeypatch.setattr(kutils, "GRAD_KEY_BLOCK_SCALAR_GATE", 16)
    args = make_inputs(family, gate, B=1, T=40, H=2, K=40, V=16, dtype=torch.float32, seed=13)
    check(family, args, TOL[torch.float32], chunk_size=16, num_segments=2)


GRAD_VARIANTS = {  # chunk switches of grad_kernel's variants (launch/ab_kernels.py); the default
    "dAT_product": {"GRAD_DAT_VIA_MEMORY": False},  # (dA^T via memory) runs in every other test
    "block_v16": {"GRAD_BLOCK_V": 16},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("family,gate,variant", [
    (f, g, v) for f in FAMILIES for g in ("none", "head") for v in GRAD_VARIANTS])
def test_per_chunk_gradients_with_fewer_products(family, gate, variant, dtype, monkeypatch):
    """``grad_kernel``'s variants: ``dA^T`` as a second product instead of read back from a
    scratch buffer (the default), value blocks other than the state passes' (three steps at
    V = 40, the last ragged); three key blocks writing the same scratch rows and a ragged
    chunk."""
    from lsp.kernels.common import chunk as kchunk

    for name, value in GRAD_VARIANTS[variant].items():
        monkeypatch.setattr(kchunk, name, value)
    monkeypatch.setattr(kutils, "GRAD_KEY_BLOCK", 16)
    monkeypatch.setattr(kutils, "GRAD_KEY_BLOCK_SCALAR_GATE", 16)
    args = make_inputs(family, gate, B=1, T=40, H=2, K=40, V=40, dtype=dtype, seed=17)
    check(family, args, TOL[dtype], chunk_size=16, num_segments=2)


WY_VARIANTS = {  # switches of the scalar-gate WY backward's variants (delta_net/stages); the
    "dL_float32": {"WY_DL_INPUT_DTYPE": False},  # default (dL in the input dtype) runs in every
}                                                # other test


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("variant", WY_VARIANTS)
@pytest.mark.parametrize("gate", ["none", "head"])
def test_wy_backward_variants(gate, variant, dtype, monkeypatch):
    """The scalar-gate WY backward with ``dL`` in float32 instead of the input dtype (the
    default): two key blocks of 32 at K = 40 (the second ragged), a ragged chunk, segments."""
    from lsp.kernels.delta_net import stages as kstages

    for name, value in WY_VARIANTS[variant].items():
        monkeypatch.setattr(kstages, name, value)
    args = make_inputs("delta_rule", gate, B=2, T=75, H=2, K=40, V=24, dtype=dtype, seed=19)
    check("delta_rule", args, TOL[dtype], chunk_size=32, num_segments=2)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("kind,K", [(0, 40), (1, 40), (2, 40), (2, 72)])
def test_segment_scan_kernel_matches_float64_loop(kind, K, reverse):
    """``scan.segment_scan`` (one launch for the in-GPU segments' affine scan) against a float64
    loop of ``x <- M_p x + Y_p`` (``M_p^T`` in reverse), ``exp(dec_p) x + Y_p``, ``x + Y_p``:
    with and without a start state, ragged key and value blocks; K = 72 runs the product
    kernel's two row blocks of 64 (the second ragged) through its barrier between steps."""
    from lsp.kernels.common.scan import segment_scan

    gen = torch.Generator().manual_seed(kind * 10 + K)
    B, H, P, V = 2, 3, 5, 40
    Y = torch.randn(B, H, P, K, V, generator=gen)
    M = torch.randn(B, H, P, K, K, generator=gen) / K ** 0.5 if kind == 2 else None
    dec = -torch.rand(B, H, P, K, generator=gen) if kind == 1 else None
    for X0 in (None, torch.randn(B, H, K, V, generator=gen)):
        X = segment_scan(kind, M, Y, X0, dec, reverse)
        x = X0.double() if X0 is not None else torch.zeros(B, H, K, V, dtype=torch.float64)
        for p in (range(P - 1, -1, -1) if reverse else range(P)):
            ref = x
            assert rel_err(X[:, :, p], ref) < 1e-6, (p, X0 is None)
            if kind == 2:
                m = M[:, :, p].double()
                x = (m.transpose(-1, -2) if reverse else m) @ x + Y[:, :, p].double()
            elif kind == 1:
                x = dec[:, :, p].double().exp().unsqueeze(-1) * x + Y[:, :, p].double()
            else:
                x = x + Y[:, :, p].double()


def test_state_augmentation_for_sequence_parallelism():
    """What the SP layer runs: values [v | 0] from state [S0 | I] give (o + q_hat-part, [B | A])
    in one call; the A block matches the delta rule's transition, here through linearity."""
    family, K, V = "delta_rule", 16, 16
    args = make_inputs(family, "head", B=1, T=37, H=1, K=K, V=V, dtype=torch.float32, seed=10)
    q, k, v, beta, g = (args[n].detach() for n in ("q", "k", "v", "beta", "g"))
    S0 = args["initial_state"].detach()
    eye = torch.eye(K).expand(1, 1, K, K)
    v_aug = torch.cat([v, torch.zeros(1, 37, 1, K)], dim=-1)
    s_aug = torch.cat([torch.zeros_like(S0), eye], dim=-1)
    o_aug, S_aug = kernels.delta_rule(q, k, v_aug, beta, g, initial_state=s_aug,
                                      output_final_state=True, chunk_size=16, num_segments=2)
    o_loc, B_loc = kernels.delta_rule(q, k, v, beta, g, output_final_state=True, chunk_size=16)
    o_full, S_full = naive_for(family)(q.double(), k.double(), v.double(), beta.double(),
                                       g.double(), initial_state=S0.double(),
                                       output_final_state=True)
    A = S_aug[..., V:]
    assert rel_err(S_aug[..., :V], B_loc) < 1e-5
    # S_end = A S0 + B and o = o_local + (q_hat-part) S0, with q_hat-part = o_aug[..., V:]
    assert rel_err(A.double() @ S0.double() + B_loc.double(), S_full) < 1e-5
    o_sp = o_loc.double() + torch.einsum("bthk,bhkv->bthv", o_aug[..., V:].double(), S0.double())
    assert rel_err(o_sp, o_full) < 1e-5


def test_public_ops_route_cpu_tensors_to_torch_and_refuse_triton():
    args = make_inputs("delta_rule", "head", B=1, T=8, H=1, K=16, V=16, dtype=torch.float32)
    pos = [t.detach() for t in op_args(args)]
    o_auto, _ = lsp.ops.delta_rule(*pos)  # auto: CPU tensors take the torch path
    o_torch, _ = lsp.ops.delta_rule(*pos, backend="torch")
    assert torch.equal(o_auto, o_torch)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        lsp.ops.delta_rule(*pos, backend="triton")


def test_kernel_input_errors():
    args = make_inputs("linear_attention", "none", B=1, T=8, H=1, K=16, V=16, dtype=torch.float32)
    q, k, v = (args[n].detach() for n in ("q", "k", "v"))
    with pytest.raises(ValueError, match="float64"):
        kernels.linear_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="interpreter computes bfloat16"):
        kernels.linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    with pytest.raises(ValueError, match="chunk_size=48"):
        kernels.linear_attention(q, k, v, chunk_size=48)
    big = torch.zeros(1, 2, 1, 512)
    with pytest.raises(ValueError, match="K=512 is above"):
        kernels.linear_attention(big, big, big[..., :16])


# Packed documents (cu_seqlens) at chunk size 32 (two sub-chunks: the off-diagonal blocks of the
# WY solve and of the per-channel pairwise products run): a document of one token, one of exactly
# a chunk, one of two chunks and a ragged tail, then four tiny ones (one chunk each).
PACKED = [0, 1, 33, 103, 104, 105, 106, 108]


def packed_inputs(family, gate, offsets, seed, H=2, K=16, V=16):
    T, N = offsets[-1], len(offsets) - 1
    args = make_inputs(family, gate, B=1, T=T, H=H, K=K, V=V, dtype=torch.float32,
                       with_state=False, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    args["initial_state"] = torch.randn(N, H, K, V, generator=gen).requires_grad_()
    return args


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_match_per_document_oracle(family, gate):
    """Outputs, per-document final states and every gradient (per-document initial states
    included) against the float64 oracle run on each document separately."""
    args = packed_inputs(family, gate, PACKED, seed=21)
    cu = torch.tensor(PACKED, dtype=torch.int32)
    fn = KERNEL_OPS[family]
    o, S, grads = outputs_and_grads(fn, args, chunk_size=32, cu_seqlens=cu)
    o_ref, S_ref, grads_ref = outputs_and_grads(naive_for(family), upcast(args),
                                                cu_seqlens=cu.long())
    assert o.shape == o_ref.shape and S.shape == (len(PACKED) - 1, 2, 16, 16)
    errs = {"o": rel_err(o, o_ref), "S": rel_err(S, S_ref)}
    errs.update({f"d{n}": rel_err(grads[n], grads_ref[n]) for n in grads})
    bad = {n: e for n, e in errs.items() if not e <= TOL[torch.float32]}
    assert not bad, f"relative errors above {TOL[torch.float32]}: {bad}"


def test_packed_documents_through_the_public_op(monkeypatch):
    """``lsp.ops`` hands the offsets to the kernels (CPU tensors reach them here only because
    the backend choice is patched; on a GPU ``backend="triton"`` takes this path)."""
    from lsp.ops import api

    monkeypatch.setattr(api, "resolve_backend", lambda op, backend, q: "triton")
    offsets = [0, 5, 6, 30]
    args = packed_inputs("delta_rule", "head", offsets, seed=22, H=1)
    cu = torch.tensor(offsets)
    o, S = call(lsp.ops.delta_rule, args, output_final_state=True, backend="triton",
                cu_seqlens=cu)
    o_ref, S_ref = call(naive_for("delta_rule"), upcast(args), output_final_state=True,
                        cu_seqlens=cu)
    assert rel_err(o, o_ref) < TOL[torch.float32] and rel_err(S, S_ref) < TOL[torch.float32]


def test_one_packed_document_is_the_dense_call():
    """``cu_seqlens = [0, T]`` runs the dense kernels (segments included): the same numbers."""
    args = make_inputs("linear_attention", "head", B=1, T=40, H=1, K=16, V=16,
                       dtype=torch.float32, seed=23)
    kw = dict(output_final_state=True, chunk_size=16, num_segments=2)
    o1, S1 = call(kernels.linear_attention, args, cu_seqlens=torch.tensor([0, 40]), **kw)
    o2, S2 = call(kernels.linear_attention, args, **kw)
    assert torch.equal(o1, o2) and torch.equal(S1, S2)


def test_chunk_indices():
    cu = torch.tensor([0, 1, 33, 103, 104], dtype=torch.int32)
    ci = kutils.prepare_chunk_indices(cu, 32)
    assert ci.dtype == torch.int32
    assert ci.tolist() == [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [3, 0]]


def test_segment_table_cuts_long_documents_only():
    """Documents of 1, 7, 2 and 10 chunks cut into segments of at most 3 chunks: near-equal
    pieces, short documents whole, and scan steps that chain each document's segments."""
    sg = kutils.Segments.build((1, 7, 2, 10), 3, "cpu")
    rows = [tuple(r) for r in sg.table.tolist()]
    assert rows == [(0, 0, 1, 0), (1, 0, 3, 1), (1, 3, 6, 1), (1, 6, 7, 1), (2, 0, 2, 8),
                    (3, 0, 3, 10), (3, 3, 6, 10), (3, 6, 9, 10), (3, 9, 10, 10)]
    assert [tuple(r) for r in sg.split.tolist()] == rows[1:4] + rows[5:]
    assert sg.first.tolist() == [0, 1, 4, 5] and sg.last.tolist() == [0, 3, 4, 8]
    (t1, s1, r1), (t2, s2, r2), (t3, s3, r3) = sg.fwd
    assert (t1.tolist(), s1.tolist(), r1.tolist()) == ([2, 6], [1, 5], [0, 3])
    assert (t3.tolist(), s3.tolist(), r3.tolist()) == ([8], [7], [5])
    (b1, c1, q1) = sg.bwd[0]
    assert (b1.tolist(), c1.tolist(), q1.tolist()) == ([2, 7], [3, 8], [2, 6])
    # a forced count cuts the longest document into that many pieces; by rule only documents
    # of more than twice the segment length are cut (the CPU counts 4 SMs: 16 programs)
    assert kutils.choose_doc_segments((1, 7, 2, 10), 2, 1, torch.device("cpu"), forced=4) == (3, 3)
    assert kutils.choose_doc_segments((1, 300, 20), 1, 1, torch.device("cpu")) == (21, 42)
    assert kutils.Segments.build((1, 300, 20), 21, "cpu", 42).NS == 1 + 15 + 1


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_cut_into_segments_match_oracle(family, gate):
    """A long document among short ones cut into in-GPU segments (pairs, scan along each
    document, outputs from the true starts): outputs, per-document final states and every
    gradient (per-document initial states included) against the float64 oracle."""
    offsets = [0, 5, 150, 152, 200]  # chunks of 16: 1, 10 (cut into 4, 4, 2), 1, 3
    args = packed_inputs(family, gate, offsets, seed=24, H=1)
    if "g" in args:  # mild decay, so a segment's start state still matters at its end
        args["g"] = (args["g"].detach() * 0.02).requires_grad_()
    cu = torch.tensor(offsets)
    o, S, grads = outputs_and_grads(KERNEL_OPS[family], args, chunk_size=16, cu_seqlens=cu,
                                    num_segments=3)
    o_ref, S_ref, grads_ref = outputs_and_grads(naive_for(family), upcast(args), cu_seqlens=cu)
    errs = {"o": rel_err(o, o_ref), "S": rel_err(S, S_ref)}
    errs.update({f"d{n}": rel_err(grads[n], grads_ref[n]) for n in grads})
    bad = {n: e for n, e in errs.items() if not e <= TOL[torch.float32]}
    assert not bad, f"relative errors above {TOL[torch.float32]}: {bad}"
    if family == "delta_rule" and gate == "head":  # no initial state: the scan starts at zero
        del args["initial_state"]
        o, _ = call(KERNEL_OPS[family], args, chunk_size=16, cu_seqlens=cu, num_segments=3)
        o_ref, _ = call(naive_for(family), upcast(args), cu_seqlens=cu)
        assert rel_err(o, o_ref) <= TOL[torch.float32]


@pytest.mark.parametrize("kw,pattern", [
    (dict(cu_seqlens=torch.tensor([0, 3, 3, 8])),
     r"not strictly increasing: cu_seqlens\[1\]=3 and cu_seqlens\[2\]=3"),
    (dict(cu_seqlens=torch.tensor([0, 3, 9])), r"ends at 9 but the sequence has T=8 tokens"),
    (dict(cu_seqlens=torch.tensor([0.0, 8.0])), r"int32 or int64"),
    (dict(cu_seqlens=torch.tensor([0, 3, 8]), initial_state=torch.zeros(1, 1, 16, 16)),
     r"initial_state has shape \[1, 1, 16, 16\]; with cu_seqlens of 2 documents"),
])
def test_packed_input_errors(kw, pattern):
    args = make_inputs("linear_attention", "none", B=1, T=8, H=1, K=16, V=16, dtype=torch.float32)
    q, k, v = (args[n].detach() for n in ("q", "k", "v"))
    with pytest.raises(ValueError, match=pattern):
        kernels.linear_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="needs a batch of 1"):
        kernels.linear_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                                 v.expand(2, -1, -1, -1), cu_seqlens=torch.tensor([0, 8]))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_slow(family, gate, chunk, dtype):
    for T, segs in ((70, 1), (70, 2), (130, 3)):
        args = make_inputs(family, gate, B=2, T=T, H=2, K=32, V=48, dtype=dtype, seed=T + chunk)
        check(family, args, TOL[dtype], chunk_size=chunk, num_segments=segs)


@pytest.mark.slow
@pytest.mark.parametrize("value", [0.0, -30.0, -1000.0])
@pytest.mark.parametrize("gate", ["head", "key"])
@pytest.mark.parametrize("family", FAMILIES)
def test_extreme_gates_slow(family, gate, value):
    args = make_inputs(family, gate, B=1, T=70, H=2, K=16, V=16, dtype=torch.float32, seed=3,
                       gate_value=value)
    check(family, args, 2e-5 if value == 0 else 1e-3, num_segments=2)


def test_grad_kernel_launch_warps(monkeypatch):
    """``grad_kernel`` runs at 4 warps for BK <= 64 (8 above): its 8-warp sm_90 build at BK = 64
    returned a wrong ``dw`` for gated delta rules on the H100 (``utils.grad_num_warps``)."""
    from lsp.kernels.common import chunk as kchunk
    from lsp.kernels.delta_net import stages as kstages

    seen = {}
    orig = kchunk.launch

    stages = {}

    def spy(kernel, grid, *a, num_warps, **kw):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)
        seen.setdefault(name, set()).add((kw.get("BK"), num_warps))
        stages.setdefault(name, set()).add(kw.get("num_stages", 2))
        return orig(kernel, grid, *a, num_warps=num_warps, **kw)

    monkeypatch.setattr(kchunk, "launch", spy)
    monkeypatch.setattr(kstages, "launch", spy)  # the delta rule's own stages launch there
    for gate in ("head", "key"):  # scalar gate: wy.py's backward; per channel: intra.py's
        for K in (32, 64):
            args = make_inputs("delta_rule", gate, 1, 20, 1, K, 16, dtype=torch.float32)
            o, _ = kernels.delta_rule(*op_args(args))
            o.sum().backward()
    assert seen["grad_kernel"] == {(32, 4), (64, 4)}
    assert seen["wy_bwd_kernel"] == {(32, 4), (64, 4)}  # the per-channel WY backward alike
    # the state passes at 4 warps up to BK = 128 (kutils.state_num_warps)
    assert seen["state_bwd_kernel"] == {(32, 4), (64, 4)}
    assert kutils.state_num_warps(128) == 4 and kutils.state_num_warps(256) == 8
    # the scalar-gate WY backward at its fixed configuration (blocks of at most bwd_bk columns)
    assert {w for _, w in seen["wy_bwd_scalar_kernel"]} == {kstages.WY_FAST["bwd_warps"]}
    assert kutils.grad_num_warps(128) == 8 and kutils.grad_num_warps(256) == 8
    # and unpipelined: its num_stages=2 sm_90 build returned a wrong dw (kchunk.GRAD_KERNEL_STAGES)
    assert stages["grad_kernel"] == {1}
