"""Layout-independent initialisation: every weight is drawn whole from a generator seeded by the
model seed and the parameter's layout-free name, and each rank keeps its shard.

So a model built under any TP x CP x EP layout starts from the same numbers as the one-process
model. Parameters carry their initialiser as ``param.lsp_init(shape, generator) -> Tensor``
(float64, cast on copy) and megatron's TP attributes (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``) say how the whole tensor is split. Expert parameters are
named by their global expert index (``lsp_expert_index``), so EP changes nothing either.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn as nn

__all__ = ["init_parameters", "shard_of", "full_shape_of", "is_tp_split", "layout_free_names"]


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()) + (seed << 32))


def is_tp_split(p: torch.Tensor) -> bool:
    """True for a parameter split over TP (megatron's attributes; experts never are)."""
    return bool(getattr(p, "tensor_model_parallel", False)) and getattr(p, "allreduce", True)


def layout_free_names(name: str, p: torch.Tensor) -> list[tuple[str, tuple | None]]:
    """``[(layout-free name, view)]`` of a parameter: one entry, ``view`` None, for ordinary
    parameters (experts renamed to their global index); one per expert for megatron's grouped
    GEMM weights, ``view = (blocks, i)`` with ``blocks[i]`` that expert's weight transposed
    (named as ``SequentialMLP`` names it, so either form maps onto the other).

    ``weight1.view(E_local, D, 2F)[i]`` is expert ``i``'s ``linear_fc1.weight`` transposed and
    ``weight2.view(E_local, F, D)[i]`` its ``linear_fc2.weight`` transposed.
    """
    if hasattr(p, "lsp_grouped_experts"):
        offset, n_local = p.lsp_grouped_experts
        prefix, kind = name.rsplit(".", 1)
        fc = {"weight1": "linear_fc1", "weight2": "linear_fc2"}[kind]
        D = p.shape[0] if kind == "weight1" else p.shape[1]
        blocks = p.view(n_local, D, -1) if kind == "weight1" else p.view(n_local, -1, D)
        return [(f"{prefix}.local_experts.{offset + i}.{fc}.weight", (blocks, i))
                for i in range(n_local)]
    if hasattr(p, "lsp_expert_index"):
        local, glob = p.lsp_expert_index
        name = name.replace(f"local_experts.{local}.", f"local_experts.{glob}.", 1)
    return [(name, None)]


def full_shape_of(p: torch.Tensor, tp: int) -> tuple:
    """The whole (one-process) shape of the local parameter ``p``."""
    shape = list(p.shape)
    if is_tp_split(p) and tp > 1:
        shape[p.partition_dim] *= tp
    return tuple(shape)


def shard_of(full: torch.Tensor, p: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's part of ``full`` (megatron's split: ``tp * stride`` pieces, every tp-th)."""
    if not (is_tp_split(p) and tp > 1):
        return full
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
    pieces = torch.chunk(full, tp * stride, dim=dim)
    return torch.cat(pieces[rank::tp], dim=dim)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, tp: int = 1, tp_rank: int = 0) -> None:
    """Fill every parameter of ``model`` from ``(seed, name)``; see the module docstring.

    ``tp``/``tp_rank``: this rank's tensor-parallel size and rank (expert parameters are never
    split over TP). Raises ``ValueError`` for a parameter without ``lsp_init``.
    """
    for name, p in model.named_parameters():
        init = getattr(p, "lsp_init", None)
        if init is None:
            raise ValueError(f"parameter {name} has no lsp_init; set param.lsp_init = fn(shape, gen)")
        for gname, view in layout_free_names(name, p):
            if view is None:
                full = init(full_shape_of(p, tp), _generator(seed, gname))
                p.copy_(shard_of(full, p, tp, tp_rank).to(p.dtype))
            else:  # one grouped-GEMM expert, drawn like its SequentialMLP weight
                blocks, i = view
                shape = (blocks.shape[2], blocks.shape[1])
                blocks[i].copy_(init(shape, _generator(seed, gname)).t().to(p.dtype))
