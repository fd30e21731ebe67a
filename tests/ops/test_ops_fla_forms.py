"""What fla accepts around the plain op form: grouped value heads (more value heads than
query/key heads) and a half-precision ``v`` beside float32 ``q``, ``k``, packed or not.
Reference: the float64 token-by-token oracle with each query/key head repeated over its group."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lsp.testing import FAMILIES, rel_err

import lsp
from lsp.ops.delta_net.naive import naive_recurrent_delta_rule
from lsp.ops.linear_attn.naive import naive_recurrent_linear_attention

OPS = {"linear_attention": lsp.ops.linear_attention, "delta_rule": lsp.ops.delta_rule}
NAIVE = {"linear_attention": naive_recurrent_linear_attention,
         "delta_rule": naive_recurrent_delta_rule}
T, H, HV, K, V = 37, 2, 4, 6, 5


def _inputs(family, dtype_v):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    a = {"q": r(1, T, H, K), "k": F.normalize(r(1, T, H, K), dim=-1), "v": r(1, T, HV, V)}
    if family == "delta_rule":
        a["beta"] = torch.sigmoid(r(1, T, HV))
    a["g"] = F.logsigmoid(r(1, T, HV))
    a["initial_state"] = r(2, HV, K, V)
    cast = {n: (t.to(dtype_v) if n == "v" else t.float()) for n, t in a.items()}
    return {n: t.requires_grad_() for n, t in cast.items()}


def _pos(family, a, expand):
    rep = (lambda x: x.repeat_interleave(HV // H, dim=2)) if expand else (lambda x: x)
    return [rep(a["q"]), rep(a["k"]), a["v"]] + (
        [a["beta"]] if family == "delta_rule" else []) + [a["g"]]


@pytest.mark.parametrize("dtype_v", [torch.float32, torch.bfloat16], ids=["v32", "vbf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_value_heads_and_half_v(family, dtype_v):
    a = _inputs(family, dtype_v)
    cu = torch.tensor([0, 20, T])
    o, S = OPS[family](*_pos(family, a, False), initial_state=a["initial_state"],
                       output_final_state=True, cu_seqlens=cu, backend="torch")
    assert o.dtype == dtype_v and o.shape == (1, T, HV, V) and S.shape == (2, HV, K, V)
    ref = {n: t.detach().double().requires_grad_() for n, t in a.items()}
    o_ref, S_ref = NAIVE[family](*_pos(family, ref, True), initial_state=ref["initial_state"],
                                 output_final_state=True, cu_seqlens=cu)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((o.float() * do.float()).sum() + S.sum(), list(a.values()))
    ref_grads = torch.autograd.grad((o_ref * do).sum() + S_ref.sum(), list(ref.values()))
    tol = 1e-5 if dtype_v == torch.float32 else 1e-2  # bf16 output rounding
    assert rel_err(o, o_ref) < tol and rel_err(S, S_ref) < 1e-5
    for n, g, gr in zip(a, grads, ref_grads):
        assert g.shape == a[n].shape and rel_err(g, gr) < tol, n


def test_value_heads_not_a_multiple_raise():
    q = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match=r"v has shape \[1, 4, 3, 3\]"):
        lsp.ops.linear_attention(q, q, torch.randn(1, 4, 3, 3))


def test_half_v_with_triton_raises():
    q = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match="v beside float32 q, k needs backend='torch'"):
        lsp.ops.linear_attention(q, q, torch.randn(1, 4, 2, 3).bfloat16(), backend="triton")
