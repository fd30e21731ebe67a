"""Halo exchange for short causal convolutions under context parallelism.

A causal convolution of width ``w`` at the first token of a contiguous sequence shard needs the
last ``w - 1`` inputs of the previous shard. :func:`halo_exchange` sends each rank's last
``width`` entries (along ``dim``) to the next rank in the group and returns what the previous
rank sent (zeros on the first rank, which sees the start of the sequence). Backward sends the
gradient of the received halo back, where it adds to the gradient of the sender's tail.

Every rank takes part in forward and backward (the first rank only sends, the last only
receives), so no rank can be left waiting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["halo_exchange"]


def _neighbours(group) -> tuple[int | None, int | None]:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    prev = dist.get_global_rank(group, rank - 1) if rank > 0 else None
    nxt = dist.get_global_rank(group, rank + 1) if rank < size - 1 else None
    return prev, nxt


def _shift(send: Tensor | None, recv_like: Tensor, to: int | None, frm: int | None, group) -> Tensor:
    """Send ``send`` to rank ``to`` and receive a ``recv_like``-shaped tensor from ``frm``."""
    recv = torch.zeros_like(recv_like)
    ops = []
    if frm is not None:
        ops.append(dist.P2POp(dist.irecv, recv, frm, group))
    if to is not None:
        ops.append(dist.P2POp(dist.isend, send, to, group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return recv


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, width: int, dim: int, group) -> Tensor:
        prev, nxt = _neighbours(group)
        ctx.meta = (width, dim, group, prev, nxt, x.shape[dim])
        tail = x.narrow(dim, x.shape[dim] - width, width).contiguous()
        return _shift(tail, tail, nxt, prev, group)  # receive from prev, send to next

    @staticmethod
    def backward(ctx, grad_halo: Tensor):
        width, dim, group, prev, nxt, length = ctx.meta
        grad_halo = grad_halo.contiguous()
        grad_tail = _shift(grad_halo, grad_halo, prev, nxt, group)  # send back, receive from next
        grad_x = grad_halo.new_zeros(grad_halo.shape[:dim] + (length,) + grad_halo.shape[dim + 1:])
        grad_x.narrow(dim, length - width, width).copy_(grad_tail)
        return grad_x, None, None, None


def halo_exchange(x: Tensor, width: int, group=None, dim: int = 1) -> Tensor:
    """The previous rank's last ``width`` entries of ``x`` along ``dim`` (zeros on rank 0).

    Args:
        x: this rank's contiguous shard, e.g. ``[B, T, C]`` with ``dim=1``.
        width: halo length (``kernel_size - 1`` for a causal convolution); ``0`` returns an
            empty tensor.
        group: the sequence (CP) group; ``None`` or a group of size 1 returns zeros.

    Returns:
        ``x``-shaped tensor with ``width`` entries along ``dim``, differentiable with respect to
        the sender's ``x``.
    """
    dim = dim % x.dim()
    shape = x.shape[:dim] + (width,) + x.shape[dim + 1:]
    if width == 0 or group is None or dist.get_world_size(group) == 1:
        return x.new_zeros(shape)
    if x.shape[dim] < width:
        raise ValueError(
            f"halo_exchange: the local shard has {x.shape[dim]} tokens but the convolution needs "
            f"{width} from the previous rank; use at least {width} tokens per rank (longer "
            f"sequences or fewer CP ranks) or a shorter convolution"
        )
    return _Halo.apply(x, width, dim, group)
