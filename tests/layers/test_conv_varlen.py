"""Short convolutions on packed documents: no value leaks across a boundary, inside a shard or
through the CP halo. Reference: torch's ``conv1d`` on each document alone (zero history)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lsp.testing import run_ranks

from lsp.layers.conv import ShortConvolution
from lsp.layers.context import ParallelContext

C, W = 6, 4
OFFSETS = [0, 1, 2, 5, 6, 7, 13, 14, 15]  # one-token documents, boundaries one tap apart


def _reference(x, weight, offsets, silu):
    """Each document alone through conv1d with its own zero padding."""
    outs = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        xd = F.pad(x[:, a:b].transpose(1, 2), (W - 1, 0))
        y = F.conv1d(xd, weight, groups=weight.shape[0]).transpose(1, 2)
        outs.append(F.silu(y) if silu else y)
    return torch.cat(outs, dim=1)


def _conv(ctx, silu):
    conv = ShortConvolution(C, W, ctx, activation="silu" if silu else None).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    return conv


def _inputs(T):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(1, T, C, generator=gen, dtype=torch.float64),
            torch.randn(1, T, C, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("silu", [True, False])
def test_packed_conv_equals_per_document_conv(silu):
    conv = _conv(ParallelContext(), silu)
    x, dy = _inputs(OFFSETS[-1])
    x.requires_grad_()
    cu = torch.tensor(OFFSETS, dtype=torch.int32)
    y = conv(x, cu_seqlens=cu)
    xr = x.detach().clone().requires_grad_()
    y_ref = _reference(xr, conv.weight.detach().clone().requires_grad_(), OFFSETS, silu)
    assert torch.allclose(y, y_ref, atol=1e-12)
    (gx,) = torch.autograd.grad((y * dy).sum(), [x])
    (gxr,) = torch.autograd.grad((y_ref * dy).sum(), [xr])
    assert torch.allclose(gx, gxr, atol=1e-12)
    # the unpacked convolution does leak: the guard against a reference that leaks too
    assert not torch.allclose(conv(x.detach()), y_ref, atol=1e-3)


def _cp_rank(rank, P, offsets, silu):
    import torch.distributed as dist

    topo = SimpleNamespace(tp=1, tp_rank=0, cp=P, cp_rank=rank, cp_group=dist.group.WORLD)
    conv = _conv(ParallelContext(topo=topo), silu)
    T = offsets[-1]
    Tl = T // P
    x, dy = _inputs(T)
    sl = slice(rank * Tl, (rank + 1) * Tl)
    xs = x[:, sl].clone().requires_grad_()
    y = conv(xs, cu_seqlens=torch.tensor(offsets))
    (gx,) = torch.autograd.grad((y * dy[:, sl]).sum(), [xs])
    xr = x.clone().requires_grad_()
    y_ref = _reference(xr, conv.weight.detach(), offsets, silu)
    (gxr,) = torch.autograd.grad((y_ref * dy).sum(), [xr])
    return float((y - y_ref[:, sl]).abs().max()), float((gx - gxr[:, sl]).abs().max())


@pytest.mark.parametrize("P", [2, 3])
def test_packed_conv_does_not_leak_through_the_halo(P):
    # 15 tokens over 3 ranks (5 each) or 14 over 2 (7 each): boundaries on rank edges, one and
    # two tokens after them (the halo taps), and one-token documents
    offsets = OFFSETS if P == 3 else [0, 1, 7, 8, 9, 11, 14]
    for silu in (True, False):
        for err_y, err_g in run_ranks(_cp_rank, P, offsets, silu):
            assert err_y < 1e-12 and err_g < 1e-12

