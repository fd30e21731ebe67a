"""Autograd all-gather of contiguous sequence shards (softmax attention under CP, LASP-2H).

``all_gather_sequence(x, group, dim)`` concatenates every rank's shard along ``dim`` in
group-rank order; backward reduce-scatters the incoming gradient, so each rank receives the sum
over all ranks of the gradient that reached its own slice. Written here rather than using
``torch.distributed.nn.functional.all_gather``, which mis-indexes ranks in backward on gloo
subgroups (docs/design.md, Pitfalls).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_sequence"]


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group) -> Tensor:
        ctx.dim, ctx.group = dim, group
        size = dist.get_world_size(group)
        front = x.movedim(dim, 0).contiguous()
        out = front.new_empty((size * front.shape[0],) + front.shape[1:])
        dist.all_gather_into_tensor(out, front, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        size = dist.get_world_size(ctx.group)
        front = grad.movedim(ctx.dim, 0).contiguous()
        out = front.new_empty((front.shape[0] // size,) + front.shape[1:])
        dist.reduce_scatter_tensor(out, front, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None


def all_gather_sequence(x: Tensor, group=None, dim: int = 1) -> Tensor:
    """Concatenate the group's shards of ``x`` along ``dim`` (group-rank order), with gradients.

    ``None`` or a group of size 1 returns ``x`` unchanged. Every rank's shard must have the same
    shape.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllGatherSeq.apply(x, dim % x.dim(), group)
