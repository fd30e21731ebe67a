"""What a layer needs to know about the process layout, and the few parallel helpers layers use.

Layers take and return megatron's ``[sequence, batch, hidden]`` layout. Under tensor
parallelism (TP > 1) the sequence between blocks is sharded over the TP group (megatron's
"sequence parallel"); a token mixer first gathers it (:meth:`ParallelContext.enter_tp`), works
on its own heads, and its output projection (a megatron ``RowParallelLinear``) reduce-scatters
back. Under context parallelism (CP > 1) each CP rank holds a contiguous slice of the sequence
in rank order and the recurrences cross ranks through :func:`sequence_op`.

Everything here is inert without a topology: ``ParallelContext()`` is the one-process layout,
and the layers then run on a single CPU or GPU with no process group at all.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lsp.parallel.exchange import METHODS as SP_METHODS  # the one list, re-exported
from lsp.parallel.exchange import check_method

__all__ = [
    "ParallelContext",
    "SP_METHODS",
    "sequence_op",
    "document_rows",
    "ColumnLinear",
    "RowLinear",
    "head_parameter",
    "replicated_parameter",
    "normal_init",
    "local_heads",
]


InitFn = Callable[[tuple, torch.Generator], Tensor]


def normal_init(std: float) -> InitFn:
    """``N(0, std^2)`` drawn from the generator (float64 draw, cast by the caller)."""
    return lambda shape, gen: torch.randn(shape, generator=gen, dtype=torch.float64) * std


def _no_init(weight: Tensor) -> None:
    """megatron's init hook: ``lsp.layers.init.init_parameters`` fills every weight instead."""


@dataclass
class ParallelContext:
    """The layout seen by a layer: a :class:`lsp.parallel.topology.Topology` (or ``None`` for one
    process), the sequence-parallel exchange method and the op backend.

    Args:
        topo: process groups; ``None`` means TP = CP = EP = DP = 1 without any process group.
        sp_method: ``"allgather"``, ``"allscan"`` or ``"ring"`` (used when CP > 1).
        backend: op backend passed to ``lsp.ops`` (``"auto"``, ``"torch"``, ``"triton"``).
        params_dtype: parameter dtype of the layers.
        sp_check: let ``sequence_parallel`` verify that the ranks agree on every call (one small
            collective per call); :meth:`sp_checks` switches it for one forward (a loop with
            static shapes checks its first step only).
        sp_num_blocks: All-Scan blocks (``None``: ``lsp.parallel``'s default).
        attention_load_balance: softmax attention under CP splits its work evenly over the ranks
            (``lsp.parallel.cp_attention``) instead of each rank scoring its own queries.
        attention_balance_overlap: with ``attention_load_balance``, start the moved rows' exchange
            before the rank's own blocks so that a pair works at once (see
            ``balanced_causal_attention``); off: own blocks first, then the exchange.
        exchange_timer: a ``lsp.parallel.sequence.ExchangeTimer`` that adds up the state
            exchange's time (the training log's ``exchange_share``), or None.
        ablate_incoming_state: a diagnostic: drop the state that arrives from earlier CP ranks
            (wrong results by design; it shows what the exchange carries).
    """

    topo: object | None = None
    sp_method: str = "allscan"
    backend: str = "auto"
    params_dtype: torch.dtype = torch.float32
    sp_check: bool = True
    sp_num_blocks: int | None = None
    attention_load_balance: bool = False
    attention_balance_overlap: bool = False
    exchange_timer: object | None = None
    ablate_incoming_state: bool = False

    def __post_init__(self):
        if self.attention_balance_overlap and not self.attention_load_balance:
            raise ValueError("attention_balance_overlap=True overlaps the balanced attention's "
                             "exchange; it needs attention_load_balance=True "
                             "(parallel.attention_load_balance=true)")
        check_method(self.sp_method, "sp_method")

    @contextlib.contextmanager
    def sp_checks(self, enabled: bool):
        """Within the block, sequence-parallel calls check (or skip checking) that the ranks
        agree; every rank must pass the same ``enabled``."""
        before, self.sp_check = self.sp_check, enabled
        try:
            yield
        finally:
            self.sp_check = before

    # sizes and ranks -------------------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        return 1 if self.topo is None else self.topo.tp

    @property
    def tp_rank(self) -> int:
        return 0 if self.topo is None else self.topo.tp_rank

    @property
    def cp_size(self) -> int:
        return 1 if self.topo is None else self.topo.cp

    @property
    def cp_rank(self) -> int:
        return 0 if self.topo is None else self.topo.cp_rank

    @property
    def dp_size(self) -> int:
        return 1 if self.topo is None else self.topo.dp

    @property
    def tp_group(self):
        return None if self.topo is None else self.topo.tp_group

    @property
    def cp_group(self):
        return None if self.topo is None else self.topo.cp_group

    @property
    def tp_cp_group(self):
        return None if self.topo is None else self.topo.tp_cp_group

    @property
    def sequence_parallel(self) -> bool:
        """The residual stream is sequence-sharded over TP (megatron SP) when TP > 1."""
        return self.tp_size > 1

    # megatron configuration for the parallel linears ------------------------------------------
    def linear_config(self, sequence_parallel: bool):
        from megatron.core.model_parallel_config import ModelParallelConfig

        return ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            context_parallel_size=self.cp_size,
            expert_model_parallel_size=1 if self.topo is None else self.topo.ep,
            expert_tensor_parallel_size=1,
            sequence_parallel=sequence_parallel and self.tp_size > 1,
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=self.params_dtype,
            gradient_accumulation_fusion=False,
        )

    # the TP region ----------------------------------------------------------------------------
    def enter_tp(self, x: Tensor) -> Tensor:
        """Gather the TP group's sequence shards ``[T/tp, B, D] -> [T, B, D]`` (identity at TP 1).

        Backward reduce-scatters: each TP rank's heads contribute a partial input gradient.
        """
        if self.tp_size == 1:
            return x
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=True, group=self.tp_group
        )


def local_heads(num_heads: int, tp: int, what: str = "num_heads") -> int:
    """Heads on this TP rank; raises ``ValueError`` when ``tp`` does not divide them."""
    if num_heads % tp != 0:
        raise ValueError(
            f"{what}={num_heads} is not divisible by the tensor-parallel size tp={tp}; heads are "
            f"split over TP ranks, so choose tp dividing {num_heads} or a head count divisible "
            f"by {tp}"
        )
    return num_heads // tp


def document_rows(cu_seqlens, B: int) -> list[Tensor] | None:
    """Per-row GLOBAL document offsets of a packed micro-batch of ``B`` rows, or ``None``.

    ``cu_seqlens`` is ``None``, one 1-D offsets tensor (``B = 1``, fla's form) or a list of
    ``B`` of them (each row is its own sequence of documents; offsets cover the whole row,
    every CP rank passes the same).
    """
    if cu_seqlens is None:
        return None
    rows = [cu_seqlens] if isinstance(cu_seqlens, Tensor) else list(cu_seqlens)
    if len(rows) != B:
        raise ValueError(
            f"cu_seqlens gives offsets for {len(rows)} rows but the micro-batch has B={B}; pass "
            "one 1-D offsets tensor per row (a single tensor only for B = 1)"
        )
    return rows


def sequence_op(op, *args, ctx: ParallelContext, cu_seqlens=None, equal_lengths: bool = True,
                **kwargs) -> Tensor:
    """Run ``op`` (``lsp.ops.linear_attention`` or ``lsp.ops.delta_rule``) on this rank's shard.

    With CP = 1 this is the op itself; with CP > 1 it is ``lsp.parallel.sequence_parallel`` over
    the CP group with the context's exchange method. Positional ``args`` are the op's tensors
    (``q, k, v[, beta][, g]``), ``kwargs`` its keywords; ``equal_lengths=False``: the ranks may
    hold different numbers of tokens (``sequence_parallel``'s keyword). Returns the local output.

    ``cu_seqlens`` (see :func:`document_rows`): packed documents, the state reset at every
    boundary. At CP = 1 the rows are laid end to end into one packed call (a row start is a
    document start); under CP each row runs through ``sequence_parallel`` with its offsets.
    """
    kwargs.setdefault("backend", ctx.backend)
    # Under CUDA autocast the L2 norm of q and k runs in float32 (autocast's fp32 list) while v
    # comes out of a linear layer in bf16; the ops take one dtype for q, k, v: use v's.
    q, k, v = args[:3]
    args = (q.to(v.dtype), k.to(v.dtype), v) + tuple(args[3:])
    rows = document_rows(cu_seqlens, q.shape[0])
    if rows is not None:
        if not equal_lengths:
            raise ValueError("packed documents (cu_seqlens) with unequal shard lengths are not "
                             "supported: the ranks' offsets would differ; restart the state at "
                             "each document start with a log-decay of -inf instead (as routed "
                             "Mixture-of-Memories does)")
        return _packed_sequence_op(op, args, ctx, rows, kwargs)
    if ctx.cp_size == 1:
        out, _ = op(*args, **kwargs)
        return out
    from lsp.parallel import sequence_parallel

    out, _ = sequence_parallel(op, *args, group=ctx.cp_group, method=ctx.sp_method,
                               num_blocks=ctx.sp_num_blocks, check=ctx.sp_check,
                               timer=ctx.exchange_timer,
                               ablate_incoming_state=ctx.ablate_incoming_state,
                               equal_lengths=equal_lengths, **kwargs)
    return out


def _packed_sequence_op(op, args, ctx: ParallelContext, rows: list[Tensor], kwargs) -> Tensor:
    B, T = args[0].shape[:2]
    if ctx.cp_size == 1:
        offsets = torch.cat([r.to(torch.int64)[:-1] + b * T for b, r in enumerate(rows)]
                            + [torch.tensor([B * T], device=rows[0].device)])
        flat = [a.reshape((1, B * T) + a.shape[2:]) for a in args]
        out, _ = op(*flat, cu_seqlens=offsets, **kwargs)
        return out.reshape((B, T) + out.shape[2:])
    from lsp.parallel import sequence_parallel

    outs = []
    for b, r in enumerate(rows):
        out, _ = sequence_parallel(op, *[a[b:b + 1] for a in args], group=ctx.cp_group,
                                   method=ctx.sp_method, num_blocks=ctx.sp_num_blocks,
                                   check=ctx.sp_check, timer=ctx.exchange_timer,
                                   ablate_incoming_state=ctx.ablate_incoming_state,
                                   cu_seqlens=r, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=0)


def _tag(param: Tensor, init: InitFn, *, tp_split: bool, dim: int = 0) -> Tensor:
    """Attach the initialiser and megatron's parallel attributes (see ``lsp.parallel.grads``)."""
    param.lsp_init = init
    if tp_split:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        set_tensor_model_parallel_attributes(param, True, dim, 1)
    else:
        param.sequence_parallel = True  # whole on every TP rank: its gradient is summed over TP
    return param


def head_parameter(full_shape: tuple, ctx: ParallelContext, init: InitFn, dim: int = 0) -> nn.Parameter:
    """A per-head parameter split with its heads over TP along ``dim`` (e.g. ``A_log [H]``)."""
    shape = list(full_shape)
    if shape[dim] % ctx.tp_size != 0:
        raise ValueError(f"parameter dim {shape[dim]} is not divisible by tp={ctx.tp_size}")
    shape[dim] //= ctx.tp_size
    p = nn.Parameter(torch.empty(shape, dtype=ctx.params_dtype))
    return _tag(p, init, tp_split=True, dim=dim)


def replicated_parameter(shape: tuple, ctx: ParallelContext, init: InitFn) -> nn.Parameter:
    """A parameter every TP rank holds whole (norm weights, routers, low-rank gate inputs)."""
    p = nn.Parameter(torch.empty(shape, dtype=ctx.params_dtype))
    return _tag(p, init, tp_split=False)


def _column_base():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    return ColumnParallelLinear


def _row_base():
    from megatron.core.tensor_parallel import RowParallelLinear

    return RowParallelLinear


class ColumnLinear(_column_base()):
    """``y = x W^T (+ b)`` with ``W``'s output rows split over TP (megatron ColumnParallelLinear).

    The input must already be gathered over TP (:meth:`ParallelContext.enter_tp`): the linear
    does no communication, and the gather's backward sums the TP ranks' input gradients.
    Output features are split contiguously, so a head-major output ``(h d)`` splits by heads.
    ``forward`` returns the output only (megatron's returns ``(output, bias)``).
    """

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, *,
                 bias: bool = False, init: InitFn | None = None):
        if out_features % ctx.tp_size != 0:
            raise ValueError(f"output width {out_features} is not divisible by tp={ctx.tp_size}")
        super().__init__(
            in_features, out_features, config=ctx.linear_config(False), init_method=_no_init,
            bias=bias, gather_output=False, disable_grad_reduce=True, tp_group=ctx.tp_group,
        )
        self.weight.lsp_init = init or normal_init(0.02)
        if bias:
            self.bias.lsp_init = lambda shape, gen: torch.zeros(shape, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


class RowLinear(_row_base()):
    """``y = x W^T`` with ``W``'s input columns split over TP (megatron RowParallelLinear).

    Input: this rank's heads ``[T, B, h*d]``; output ``[T/tp, B, D]`` reduce-scattered over TP
    (sequence-parallel residual stream), or ``[T, B, D]`` at TP 1.
    """

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, *,
                 init: InitFn | None = None):
        if in_features % ctx.tp_size != 0:
            raise ValueError(f"input width {in_features} is not divisible by tp={ctx.tp_size}")
        super().__init__(
            in_features, out_features, config=ctx.linear_config(True), init_method=_no_init,
            bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=ctx.tp_group,
        )
        self.weight.lsp_init = init or normal_init(0.02)

    def forward(self, x: Tensor) -> Tensor:
        if self.tp_group is None:  # no process group at all: one process
            return F.linear(x, self.weight)
        return super().forward(x)[0]


def default_out_init(std: float, num_layers: int) -> InitFn:
    """Output projections: ``std / sqrt(2 * num_layers)`` (GPT-2 / fla residual rescaling)."""
    return normal_init(std / math.sqrt(2 * max(1, num_layers)))
