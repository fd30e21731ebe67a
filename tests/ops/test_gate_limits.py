"""Log-gates at their limits: ``-inf`` (a full forget, a hard reset of the state) is exact on every
backend the CPU runs, against the float64 per-token oracle (which is finite), gradients included;
positive log-gates (a growing state) are refused.

The gradient of ``g`` where ``g = -inf`` is the oracle's: ``d/dg (exp(g) x) = exp(g) x = 0``.
"""

from __future__ import annotations

from triton_env import interpreted

with interpreted():
    import lsp.kernels.common.chunk  # noqa: F401  (decorates every kernel for the interpreter)
    from lsp.kernels.common import utils as kutils

import pytest  # noqa: E402
import torch  # noqa: E402
from gate_limit_cases import OPS, forget_at, oracle, sp_errors  # noqa: E402
from lsp.testing import FAMILIES, make_inputs, outputs_and_grads, rel_err, run_ranks  # noqa: E402

from lsp import kernels  # noqa: E402

GATE_KINDS = ("head", "key")  # one decay per head [B,T,H], per key channel [B,T,H,K]
# -inf on the first token, inside the first 16-token chunk, on both sides of a chunk boundary
# and on the last token; per key channel also on single channels
# (16-token chunks in the kernels, 64 in the torch path)
FORGETS = forget_at([0, 5, 15, 16, 33, 36, 63, 64], channels=[(2, 0), (9, 3), (20, 1), (66, 2)])


def _check(fn, family, args, tol, **kw):
    o, S, grads = outputs_and_grads(fn, args, **kw)
    o_ref, S_ref, ref = oracle(family, args)
    gen = torch.Generator().manual_seed(1)  # the cotangents outputs_and_grads draws
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    dS = torch.randn(S_ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(), list(ref.values()))
    assert torch.isfinite(S_ref).all() and all(torch.isfinite(r).all() for r in ref_grads)
    errs = {"o": rel_err(o, o_ref), "S": rel_err(S, S_ref)}
    errs.update({"d" + n: rel_err(grads[n], r) for n, r in zip(ref, ref_grads)})
    bad = {n: e for n, e in errs.items() if not e <= tol}  # `not <=` also catches NaN
    assert not bad, f"relative errors above {tol}: {bad}"
    assert torch.isfinite(grads["g"]).all()
    # the gradient at a full forget is the oracle's zero, not a rounding residue
    dg_at_forget = grads["g"][args["g"].detach() == float("-inf")]
    assert dg_at_forget.numel() > 0 and torch.all(dg_at_forget == 0)


@pytest.mark.parametrize("gate", GATE_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_full_forget_torch_path(family, gate, dtype):
    args = make_inputs(family, gate, B=2, T=70, H=2, K=4, V=3, dtype=dtype, gate_fn=FORGETS)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    _check(OPS[family], family, args, tol, backend="torch")


@pytest.mark.parametrize("gate", GATE_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_forget_one_token(family, gate):
    args = make_inputs(family, gate, B=1, T=1, H=1, K=4, V=3, gate_fn=forget_at([0]))
    _check(OPS[family], family, args, 1e-12, backend="torch")


@pytest.mark.parametrize("gate", GATE_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_forget_triton_interpreter(family, gate, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kutils.interpreted()
    fn = {"linear_attention": kernels.linear_attention, "delta_rule": kernels.delta_rule}[family]
    args = make_inputs(family, gate, B=1, T=37, H=2, K=16, V=8, dtype=torch.float32,
                       gate_fn=FORGETS)
    _check(fn, family, args, 2e-5, chunk_size=16, num_segments=2)


@pytest.mark.parametrize("gate", GATE_KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_very_negative_gates_dg_error_stays_at_float32_rounding(family, gate, monkeypatch):
    """Log-gates of -30 to -70 per token (fla's test row with normaliser 0.01 gives gates of this
    size): the true ``dg`` is ~1e-13, while the per-token terms it is summed from (``|dq q|``,
    ``|dk k|``) are O(10). The kernels' absolute error is float32 cancellation, bounded by
    eps x terms wherever it shows: a token's own ``q_t . k_t`` (decay ``exp(0)``) enters its
    ``dG`` through ``dq q`` and through ``dk k`` with opposite signs (per-channel gate: about
    6e-8 on terms of 6, the size fla's row reported), and the same through the segment states
    when a sequence is cut into in-GPU segments. The bound is per chunk, so it holds at every
    length: checked on one chunk run and on a segmented one."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fn = {"linear_attention": kernels.linear_attention, "delta_rule": kernels.delta_rule}[family]

    def very_negative(shape, gen):
        return -30.0 - 40.0 * torch.rand(shape, generator=gen, dtype=torch.float64)

    for T, segments in ((40, 1), (300, 3)):
        args = make_inputs(family, gate, B=1, T=T, H=1, K=16, V=8, dtype=torch.float32,
                           gate_fn=very_negative)
        _, _, grads = outputs_and_grads(fn, args, chunk_size=16, num_segments=segments)
        _, _, ref = outputs_and_grads(OPS[family], {n: a.detach().double().requires_grad_()
                                                     for n, a in args.items()}, backend="torch")
        q, k = args["q"].double(), args["k"].double()
        terms = (ref["q"] * q).abs().sum(-1).max() + (ref["k"] * k).abs().sum(-1).max()
        err = (grads["g"].double() - ref["g"]).abs().max()
        assert torch.isfinite(grads["g"]).all()
        eps = torch.finfo(torch.float32).eps
        assert err <= eps * terms, f"T={T}: dg abs error {err:.2e}, eps x terms {eps * terms:.2e}"


@pytest.mark.parametrize("P", [2, 3])
def test_full_forget_sequence_parallel(P):
    cases = [(f, g, d) for f in FAMILIES for g in GATE_KINDS
             for d in (torch.float64, torch.float32)]
    per_rank = run_ranks(sp_errors, P, cases)
    for res in per_rank:
        for cid, errs in res.items():
            tol = 1e-10 if "float64" in cid else 1e-5
            assert errs.pop("dg_finite") == 1.0, cid
            bad = {n: e for n, e in errs.items() if not e <= tol}
            assert not bad, f"{cid}: relative errors above {tol}: {bad}"


@pytest.mark.parametrize("family", FAMILIES)
def test_positive_log_gates_are_refused(family):
    args = make_inputs(family, "head", B=1, T=8, H=1, K=4, V=3)
    pos = [args[n].detach() for n in ("q", "k", "v", "beta") if n in args]
    g = args["g"].detach().clone()
    g[0, 3, 0] = 5.0
    with pytest.raises(ValueError, match=r"g has 1 positive entries \(max 5\).*must be <= 0"):
        OPS[family](*pos, g)
    g[0, 3, 0] = float("-inf")  # the limit is allowed, and so is NaN (it propagates, as in torch)
    OPS[family](*pos, g)
    g[0, 3, 0] = float("nan")
    assert torch.isnan(OPS[family](*pos, g)[0]).any()
