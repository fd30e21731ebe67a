"""Gradient reduction for the DP x CP x TP x EP grid (what megatron's DDP + finalize does).

Convention: each rank back-propagates its own share of the loss (``lsp.model`` returns it), so
the gradient of the global loss is the *sum* of the per-rank gradients over the ranks that hold
a copy of the parameter. Which ranks those are is read from megatron's parameter attributes,
which ``lsp.model`` sets on every parameter:

- expert parameters (``param.allreduce is False``): replicated over the expert-data-parallel
  group (every rank with the same EP rank), summed there;
- dense parameters: replicated over DP x CP, summed there; and those not split over TP
  (``param.sequence_parallel is True``: norms, routers, low-rank gate projections...) see only
  their own TP rank's tokens or heads, so they are summed over TP as well.

megatron's ``DistributedDataParallel`` + ``finalize_model_grads`` group parameters by the same
attributes (it averages over DP x CP instead of summing; scale the loss by ``dp * cp`` there).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["reduce_gradients", "is_expert_param", "is_tp_replicated"]


def is_expert_param(p: torch.nn.Parameter) -> bool:
    return getattr(p, "allreduce", True) is False


def is_tp_replicated(p: torch.nn.Parameter) -> bool:
    return bool(getattr(p, "sequence_parallel", False)) and not is_expert_param(p)


def _all_reduce(grads: list[torch.Tensor], group) -> None:
    if not grads or group is None or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


@torch.no_grad()
def reduce_gradients(model: torch.nn.Module, topo) -> None:
    """Sum each parameter's ``.grad`` over the ranks that share the parameter (see module doc).

    Every rank must call it (it is collective over the groups of ``topo``). Parameters without a
    gradient get a zero gradient first, so that all ranks reduce the same buffers.
    """
    dense, replicated, expert = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if is_expert_param(p):
            expert.append(p.grad)
        else:
            dense.append(p.grad)
            if is_tp_replicated(p):
                replicated.append(p.grad)
    _all_reduce(dense, topo.dp_cp_group)
    _all_reduce(replicated, topo.tp_group)
    _all_reduce(expert, topo.expt_dp_group)
