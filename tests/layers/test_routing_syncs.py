"""MoE dispatch without a host sync (``capacity_factor``, megatron's drop-and-pad dispatch): at
``num_experts / topk`` it drops nothing and equals the dropless layer, output and gradients; a
smaller factor drops tokens (a different result, so it is opt-in); out-of-range values raise.
The GPU side (no unexpected sync in a whole step) is ``python -m lsp.launch.check_syncs``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lsp.testing import run_ranks

E, TOPK, D, FFN, T, B = 4, 2, 16, 24, 32, 2


def _moe_rank(rank, world, factors):
    from lsp.layers import MoEFFN, ParallelContext, init_parameters
    from lsp.parallel.topology import init_topology

    topo = init_topology()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(T, B, D, generator=gen)
    dy = torch.randn(T, B, D, generator=gen)
    out = []
    for cf in factors:
        torch.manual_seed(0)
        layer = MoEFFN(D, E, TOPK, FFN, ParallelContext(topo), capacity_factor=cf,
                       aux_loss_coeff=0.01)
        init_parameters(layer, seed=7)
        x = x0.clone().requires_grad_()
        y, aux = layer(x)
        ((y * dy).sum() + aux).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        out.append((y.detach(), x.grad, grads))
    return out


def test_padded_dispatch_at_full_capacity_equals_dropless():
    (ref, full, small), = run_ranks(_moe_rank, 1, [None, E / TOPK, 1.0])
    assert torch.allclose(full[0], ref[0], rtol=0, atol=1e-6)
    assert torch.allclose(full[1], ref[1], rtol=0, atol=1e-6)
    assert full[2].keys() == ref[2].keys()
    for n in ref[2]:
        assert torch.allclose(full[2][n], ref[2][n], rtol=0, atol=1e-6), n
    # capacity factor 1: an expert over its share of the tokens drops some, so the output moves
    assert (small[0] - ref[0]).norm() / ref[0].norm() > 1e-2


@pytest.mark.parametrize("cf", [0.0, -1.0, E / TOPK + 0.5])
def test_capacity_factor_out_of_range_is_refused(cf):
    from lsp.layers import MoEFFN, ParallelContext

    ctx = ParallelContext(SimpleNamespace(tp=1, cp=1, ep=1, dp=1), backend="torch")
    with pytest.raises(ValueError, match=rf"capacity_factor={cf} must lie in \(0, num_experts"):
        MoEFFN(D, E, TOPK, FFN, ctx, capacity_factor=cf)
