"""The two collectives the layers add: the conv halo exchange and the sequence all-gather."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lsp.layers import ParallelContext, ShortConvolution, init_parameters
from lsp.parallel.topology import init_topology
from lsp.testing import run_ranks

B, T, C, W = 2, 12, 6, 4


def _conv_case(ctx):
    conv = ShortConvolution(C, W, ParallelContext(params_dtype=torch.float64) if ctx is None else ctx)
    init_parameters(conv, seed=3)
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    return conv, x, dy


def _halo_rank(rank, world):
    topo = init_topology(cp=world)
    conv, x, dy = _conv_case(ParallelContext(topo, params_dtype=torch.float64))
    t = T // world
    xs = x[:, rank * t:(rank + 1) * t].clone().requires_grad_()
    y = conv(xs)
    (y * dy[:, rank * t:(rank + 1) * t]).sum().backward()
    wgrad = conv.weight.grad.clone()
    dist.all_reduce(wgrad, group=topo.cp_group)
    return y.detach(), xs.grad, wgrad


@pytest.mark.parametrize("world", [2, 3])
def test_short_conv_with_halo_equals_the_whole_sequence(world):
    conv, x, dy = _conv_case(None)
    x = x.clone().requires_grad_()
    y = conv(x)
    (y * dy).sum().backward()
    # reference: plain causal depthwise conv with left zero padding
    ref = F.silu(F.conv1d(F.pad(x.detach().transpose(1, 2), (W - 1, 0)), conv.weight.detach(),
                          groups=C)).transpose(1, 2)
    assert torch.allclose(y, ref, rtol=0, atol=1e-12)
    out = run_ranks(_halo_rank, world)
    assert torch.allclose(torch.cat([o[0] for o in out], 1), y.detach(), rtol=0, atol=1e-12)
    assert torch.allclose(torch.cat([o[1] for o in out], 1), x.grad, rtol=0, atol=1e-12)
    assert torch.allclose(out[0][2], conv.weight.grad, rtol=0, atol=1e-12)


def _short_shard_rank(rank, world):
    topo = init_topology(cp=world)
    conv = ShortConvolution(C, 8, ParallelContext(topo))
    try:
        conv(torch.zeros(1, 4, C))
    except ValueError as e:
        return str(e)
    return "no error"


def test_halo_wider_than_the_shard_raises_on_every_rank():
    msgs = run_ranks(_short_shard_rank, 2)
    assert all("the local shard has 4 tokens but the convolution needs 7" in m for m in msgs)


def _gather_rank(rank, world):
    from lsp.parallel.seq_gather import all_gather_sequence

    topo = init_topology(tp=2, cp=2)  # CP groups {0, 2} and {1, 3}: subgroups, not the world
    x = torch.full((2, 3, 4), float(rank + 1), dtype=torch.float64, requires_grad=True)
    y = all_gather_sequence(x, topo.cp_group, dim=1)
    weight = torch.arange(y.numel(), dtype=torch.float64).view_as(y) * (rank + 1)
    (y * weight).sum().backward()
    return dist.get_process_group_ranks(topo.cp_group), y.detach(), x.grad


def test_sequence_all_gather_orders_ranks_and_reduces_gradients_on_subgroups():
    out = run_ranks(_gather_rank, 4)
    for rank, (members, y, grad) in enumerate(out):
        assert members == ([0, 2] if rank % 2 == 0 else [1, 3])
        expect = torch.cat([torch.full((2, 3, 4), float(m + 1), dtype=torch.float64)
                            for m in members], 1)
        assert torch.equal(y, expect)
        # d/dx_r of sum_q (y_q * w_q) = sum over the group of w_q's slice at r's position
        base = torch.arange(y.numel(), dtype=torch.float64).view_as(y)
        pos = members.index(rank)
        want = sum((m + 1) * base[:, pos * 3:(pos + 1) * 3] for m in members)
        assert torch.equal(grad, want)
