"""Mixture-of-Memories: reduces to Gated DeltaNet; its dense masked form equals running each
memory on its routed tokens only (float64 per-token oracle); the router loss is usable."""

from __future__ import annotations

import torch

from lsp.layers import GatedDeltaNet, MixtureOfMemories, ParallelContext, init_parameters
from lsp.layers.common import l2norm, split_heads
from lsp.ops.delta_net.naive import naive_recurrent_delta_rule

D, H, DK, T, B = 16, 2, 4, 11, 2
CTX64 = ParallelContext(backend="torch", params_dtype=torch.float64)


def _x(seed=0, dtype=torch.float64):
    return torch.randn(T, B, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_one_memory_top1_without_shared_memory_is_gated_deltanet():
    gdn = GatedDeltaNet(D, H, DK, expand_v=2.0, ctx=CTX64)
    mom = MixtureOfMemories(D, H, DK, expand_v=2.0, num_memories=1, topk=1, shared_memory=False,
                            ctx=CTX64)
    init_parameters(gdn, seed=1, tp=1)
    init_parameters(mom, seed=2, tp=1)
    weights = {"k_proj.0": "k_proj", "v_proj.0": "v_proj", "b_proj.0": "b_proj", "a_proj.0": "a_proj"}
    src = dict(gdn.named_parameters())
    with torch.no_grad():
        for name, p in mom.named_parameters():
            if name == "router":
                continue
            key = name
            for a, b in weights.items():
                key = key.replace(a, b)
            p.copy_(src[key])
    x1, x2 = _x().requires_grad_(), _x().requires_grad_()
    y1, aux1 = gdn(x1)
    y2, aux2 = mom(x2)
    assert aux1 is None and torch.isfinite(aux2)
    assert torch.allclose(y1, y2, rtol=1e-12, atol=1e-12)
    dy = _x(seed=9)
    (y1 * dy).sum().backward()
    (y2 * dy).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    for name, p in mom.named_parameters():
        if name != "router":
            key = name
            for a, b in weights.items():
                key = key.replace(a, b)
            assert torch.allclose(p.grad, src[key].grad, rtol=1e-10, atol=1e-12), name


def _compacted_reference(mom: MixtureOfMemories, x: torch.Tensor) -> torch.Tensor:
    """Each memory run by the per-token oracle on its routed tokens only, mixed by weight."""
    weights, mask, _ = mom.route(x)
    xb = x.transpose(0, 1)
    w, m = weights.transpose(0, 1), mask.transpose(0, 1).bool()  # [B, T, M]
    q = l2norm(split_heads(mom.q_conv(mom.q_proj(xb)), mom.dk))
    out = torch.zeros(B, T, H, mom.dv, dtype=x.dtype)
    n = len(mom.k_proj)
    for j in range(n):
        k = l2norm(split_heads(mom.k_conv(mom.k_proj[j](xb)), mom.dk))
        v = split_heads(mom.v_conv(mom.v_proj[j](xb)), mom.dv)
        beta = torch.sigmoid(mom.b_proj[j](xb))
        g = -mom.A_log.exp() * torch.nn.functional.softplus(mom.a_proj[j](xb) + mom.dt_bias)
        for b in range(B):
            idx = torch.arange(T) if j == mom.M else m[b, :, j].nonzero().flatten()
            if idx.numel() == 0:
                continue
            o, _ = naive_recurrent_delta_rule(q[b:b + 1, idx], k[b:b + 1, idx], v[b:b + 1, idx],
                                              beta[b:b + 1, idx], g[b:b + 1, idx])
            scale = 1.0 if j == mom.M else w[b, idx, j][:, None, None]
            out[b, idx] += o[0] * scale
    return out


def test_dense_masked_memories_equal_per_memory_compaction():
    mom = MixtureOfMemories(D, H, DK, num_memories=3, topk=2, shared_memory=True, ctx=CTX64)
    init_parameters(mom, seed=4, tp=1)
    with torch.no_grad():
        mom.router.mul_(20)  # decisive routing, so that memories see different token subsets
    x = _x(seed=3)
    captured = {}
    norm_forward = mom.o_norm.forward
    mom.o_norm.forward = lambda o, gate=None: captured.setdefault("o", o) * 0 + norm_forward(o, gate)
    mom(x)
    ref = _compacted_reference(mom, x)
    _, mask, _ = mom.route(x)
    counts = mask.sum((0, 1))
    assert (counts > 0).all() and (counts < T * B).all()  # every memory sees some, not all
    assert torch.allclose(captured["o"], ref, rtol=1e-10, atol=1e-12)


def test_router_loss_is_finite_and_differentiable():
    mom = MixtureOfMemories(D, H, DK, num_memories=4, topk=2, ctx=ParallelContext(backend="torch"))
    init_parameters(mom, seed=5, tp=1)
    y, aux = mom(_x(dtype=torch.float32))
    assert aux is not None and aux.ndim == 0 and torch.isfinite(aux)
    # coeff * M * sum_m f_m P_m is coeff for perfect balance and lies in (0, coeff * M]
    assert 0 < aux.item() <= mom.aux_loss_coeff * mom.M
    (g,) = torch.autograd.grad(aux, mom.router)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    mom.eval()
    assert mom(_x(dtype=torch.float32))[1] is None  # no balancing loss outside training
