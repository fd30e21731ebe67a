"""The softmax-attention backend setting (``model.attention_backend``): what ``auto`` picks on the
CPU, the errors for a backend that cannot run, and that the ``math`` backend's block forward and
merged-statistics backward equal torch's own kernels (the path before the setting existed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lsp.parallel.cp_attention import (
    BACKENDS,
    BlockAttention,
    _math_backward,
    _math_forward,
    attention_backward,
    attention_forward,
    resolve_backend,
)


def _qkv(Tq, Sk, dtype=torch.float64, B=2, H=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, d, generator=g, dtype=dtype)
    k = torch.randn(B, H, Sk, d, generator=g, dtype=dtype)
    v = torch.randn(B, H, Sk, d, generator=g, dtype=dtype)
    do = torch.randn(B, H, Tq, d, generator=g, dtype=dtype)
    return q, k, v, do


def test_auto_is_math_on_the_cpu():
    q, k, _, _ = _qkv(8, 8)
    assert resolve_backend("auto", [(q, k, True)]) == "math"
    assert resolve_backend("math", [(q, k, True)]) == "math"


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_a_gpu_backend_on_the_cpu_is_refused_with_the_fix(backend):
    q, k, _, _ = _qkv(8, 16)
    with pytest.raises(ValueError, match=rf"attention_backend='{backend}' cannot run.*CUDA "
                                         r"devices only.*use attention_backend=math"):
        resolve_backend(backend, [(q, k, False)])


def test_an_unknown_backend_is_refused_everywhere_it_enters():
    from lsp.layers.attention import SoftmaxAttention
    from lsp.model.config import ModelConfig

    q, k, _, _ = _qkv(8, 8)
    with pytest.raises(ValueError, match=r"attention_backend='fast'.*'auto', 'cudnn', 'flash'"):
        resolve_backend("fast", [(q, k, True)])
    with pytest.raises(ValueError, match=r"attention_backend='fast'.*use one of"):
        ModelConfig(attention_backend="fast")
    with pytest.raises(ValueError, match=r"attention_backend='fast'"):
        SoftmaxAttention(16, 2, 8, attention_backend="fast")
    assert BACKENDS == ("auto", "cudnn", "flash", "math")
    ModelConfig(attention_backend="cudnn")  # valid names pass the config check


def test_cudnn_without_the_balanced_layout_is_refused_before_the_gather(monkeypatch):
    # unbalanced CP needs a lower-right causal mask on ranks r > 0, which torch's cuDNN op does
    # not align: every rank refuses before the K/V all-gather (no rank left in a collective)
    from lsp.layers import attention

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    gathered = []
    monkeypatch.setattr("lsp.parallel.seq_gather.all_gather_sequence",
                        lambda *a, **k: gathered.append(1))
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="attention_load_balance=true"):
        attention.causal_attention(q, q, q, group=object(), load_balance=False, backend="cudnn")
    assert not gathered


def _reference(q, k, v, do, causal):
    """Explicit float64 softmax attention (lower-right causal mask) and its autograd gradients."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    Tq, Sk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        s = s.masked_fill(~torch.ones(Tq, Sk, dtype=torch.bool).tril(Sk - Tq), float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = s.softmax(-1) @ v
    (o * do.double()).sum().backward()
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("Tq,Sk,causal", [(12, 12, True), (6, 18, True), (6, 18, False)],
                         ids=["square-causal", "lower-right-causal", "full"])
def test_math_block_equals_an_explicit_float64_softmax(Tq, Sk, causal):
    # the math backend as dispatched (torch's CPU kernel where it applies) and its explicit
    # formula (lower-right blocks, GPUs) both equal autograd through a float64 softmax
    q, k, v, do = _qkv(Tq, Sk)
    ref = _reference(q, k, v, do, causal)
    out, lse, st = attention_forward(q, k, v, causal, "math")
    grads = attention_backward(do, q, k, v, out, lse, causal, st, "math")
    for name, got, want in zip(["o", "lse", "dq", "dk", "dv"], (out, lse) + grads, ref):
        assert torch.allclose(got, want, rtol=0, atol=1e-12), name
    out, lse, _ = _math_forward(q, k, v, causal)
    grads = _math_backward(do, q, k, v, out, lse, causal)
    for name, got, want in zip(["o", "lse", "dq", "dk", "dv"], (out, lse) + grads, ref):
        assert torch.allclose(got, want, rtol=0, atol=1e-12), f"formula {name}"


def test_math_equals_the_sdpa_path_it_replaces():
    # before the setting, one rank ran torch's SDPA (is_causal); the math backend matches it,
    # outputs and gradients, in float32
    q, k, v, do = _qkv(16, 16, torch.float32)
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    o = BlockAttention.apply(*a, True, "math")
    (o * do).sum().backward()
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = F.scaled_dot_product_attention(*b, is_causal=True)
    (o_ref * do).sum().backward()
    assert torch.allclose(o, o_ref, rtol=0, atol=1e-5)
    for x, y, name in zip(a, b, "qkv"):
        assert torch.allclose(x.grad, y.grad, rtol=0, atol=1e-5), f"d{name}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_math_merged_backward_equals_the_cpu_flash_kernels(causal):
    # the balanced CP path on the CPU ran torch's CPU flash kernels with the merged output and
    # log-sum-exp; the math backend gives the same forward, log-sum-exp and merged backward
    # (the explicit formula, which the math backend runs on a GPU)
    q, k, v, do = _qkv(10, 10)
    aten = torch.ops.aten
    o_ref, lse_ref = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[:2]
    out, lse, _ = _math_forward(q, k, v, causal)
    assert torch.allclose(out, o_ref, rtol=0, atol=1e-12)
    assert torch.allclose(lse, lse_ref, rtol=0, atol=1e-12)
    # a merged output and log-sum-exp from another key set (as the partner's rows get)
    o_m, lse_m = out * 0.7 + 0.1, lse + 0.3
    want = aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o_m, lse_m,
                                                                     0.0, causal)
    got = _math_backward(do, q, k, v, o_m, lse_m, causal)
    for name, g, w in zip(["dq", "dk", "dv"], got, want):
        assert torch.allclose(g, w, rtol=0, atol=1e-12), name
