"""Feed-forward blocks: a dense SwiGLU MLP and megatron-core's MoE layer.

Both take megatron's ``[T_local, B, D]`` (sequence-sharded over TP when TP > 1) and return
``(output, aux_loss or None)``. The dense MLP uses the mixers' column/row-parallel linears.

:class:`MoEFFN` is megatron's ``MoELayer``: top-k softmax router, the all-to-all token
dispatcher over the expert-parallel group, SwiGLU experts (``SequentialMLP``; ``GroupedMLP``
with ``grouped_gemm=True`` on GPUs where megatron's grouped GEMM is installed), an optional
shared expert, dropless by default. Experts are split over EP and never inside
(expert TP = 1), replicated over the other ranks. The router's per-sequence load-balancing
loss (megatron's ``seq_aux_loss``: counts summed over the TP x CP ranks of a sequence) is
returned to the caller instead of being injected into backward, so it reaches the total loss
explicitly.

Host synchronisation: dropless dispatch (``capacity_factor=None``) sizes every expert's token
slice on the host, so megatron's alltoall dispatcher copies the per-expert counts to the host
and waits for them once per MoE layer forward (its ``cuda_sync_point``; the experts then split
their input with those sizes), and its unfused permute selects the routed tokens with
``masked_select`` (a data-dependent output size: another wait). Neither can go without fixing
the sizes in advance. ``capacity_factor`` does that: megatron's drop-and-pad dispatch
(``moe_expert_capacity_factor`` with ``moe_pad_expert_input_to_capacity``) gives every expert
``ceil(tokens * topk / num_experts * capacity_factor)`` rows, selected by sort rather than by
mask, and its sync point is ``no_sync``. Tokens beyond an expert's capacity are dropped (lowest
router probability first); ``capacity_factor = num_experts / topk`` gives every expert room for
every token, so nothing is dropped and the result equals dropless dispatch, at
``num_experts / topk`` times the expert FLOPs (padding rows carry router weight 0).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lsp.layers.context import (
    ColumnLinear,
    ParallelContext,
    RowLinear,
    default_out_init,
    normal_init,
)

__all__ = ["DenseFFN", "MoEFFN", "transformer_config", "grouped_gemm_available"]


def grouped_gemm_available() -> bool:
    """megatron's ``GroupedMLP`` can run here (CUDA and the ``grouped_gemm`` package)."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.transformer.moe import grouped_gemm_util

    return grouped_gemm_util.grouped_gemm_is_available()


def transformer_config(
    ctx: ParallelContext,
    hidden_size: int,
    ffn_hidden_size: int,
    *,
    num_experts: int | None = None,
    moe_topk: int = 2,
    moe_ffn_hidden_size: int | None = None,
    moe_shared_expert_size: int | None = None,
    moe_aux_loss_coeff: float = 0.0,
    grouped_gemm: bool = False,
    moe_capacity_factor: float | None = None,
):
    """The megatron ``TransformerConfig`` for the FFN blocks of this layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lsp.layers.context import _no_init

    tp = ctx.tp_size
    moe = {}
    if num_experts:
        moe = dict(
            num_moe_experts=num_experts,
            moe_router_topk=moe_topk,
            moe_ffn_hidden_size=moe_ffn_hidden_size or ffn_hidden_size,
            moe_shared_expert_intermediate_size=moe_shared_expert_size,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="seq_aux_loss",
            moe_aux_loss_coeff=moe_aux_loss_coeff,
            moe_grouped_gemm=grouped_gemm,
            moe_router_dtype="fp32",  # the router also runs outside autocast: see MoEFFN
        )
        if moe_capacity_factor is not None:  # drop-and-pad dispatch: no host sync (module doc)
            moe.update(moe_expert_capacity_factor=moe_capacity_factor,
                       moe_pad_expert_input_to_capacity=True, moe_token_drop_policy="probs")
    return TransformerConfig(
        num_layers=1,
        hidden_size=hidden_size,
        num_attention_heads=tp,  # unused by the FFN blocks; any multiple of tp passes the checks
        ffn_hidden_size=ffn_hidden_size,
        tensor_model_parallel_size=tp,
        context_parallel_size=ctx.cp_size,
        expert_model_parallel_size=1 if ctx.topo is None else ctx.topo.ep,
        expert_tensor_parallel_size=1,
        sequence_parallel=tp > 1,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method=_no_init,
        output_layer_init_method=_no_init,
        params_dtype=ctx.params_dtype,
        bf16=False,
        gradient_accumulation_fusion=False,
        **moe,
    )


def _mlp_spec():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _set_inits(module: nn.Module, init_std: float, num_layers: int) -> None:
    out = default_out_init(init_std, num_layers)
    for name, p in module.named_parameters():
        p.lsp_init = out if ("fc2" in name or name.endswith("weight2")) else normal_init(init_std)


class DenseFFN(nn.Module):
    """SwiGLU MLP ``W_down (silu(W_gate x) * (W_up x))``, its hidden width split over TP.

    Written with the same column/row parallel linears as the mixers (gather the TP sequence
    shards once, reduce-scatter at the output), so it also runs without any process group.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, ctx: ParallelContext | None = None,
                 *, init_std: float = 0.02, num_layers: int = 1):
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        if ffn_hidden_size % ctx.tp_size:
            raise ValueError(
                f"ffn_hidden_size={ffn_hidden_size} is not divisible by tp={ctx.tp_size}"
            )
        init = normal_init(init_std)
        self.gate_proj = ColumnLinear(hidden_size, ffn_hidden_size, ctx, init=init)
        self.up_proj = ColumnLinear(hidden_size, ffn_hidden_size, ctx, init=init)
        self.down_proj = RowLinear(ffn_hidden_size, hidden_size, ctx,
                                   init=default_out_init(init_std, num_layers))

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        x = self.ctx.enter_tp(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None


def _router_class():
    from megatron.core.transformer.moe.router import TopKRouter

    class ExplicitAuxLossRouter(TopKRouter):
        """megatron's ``TopKRouter`` that hands the load-balancing loss to the caller
        (``self.aux_loss``) instead of attaching it to the activations for backward."""

        aux_loss: Tensor | None = None

        def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss,
                                               aux_loss_name, reduce_group, *args, **kwargs):
            self.aux_loss = aux_loss if self.aux_loss is None else self.aux_loss + aux_loss
            return activation

    return ExplicitAuxLossRouter


def checkpoint_routing_replay():
    """megatron-core's ``RouterReplay`` (per-layer record / replay of the router's top-k
    experts) made to issue the same ops in both directions, as torch's selective checkpointing
    requires of a recomputation: megatron records with ``topk`` and replays with ``gather``
    alone; here both run ``topk`` and take the weights with ``gather`` at the recorded (or
    replayed) experts, which in the recording run equals ``topk``'s values. Out of megatron's
    class-level registry: lsp drives each layer's own, not megatron's global switches."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    class CheckpointRouterReplay(RouterReplay):
        def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                            default_compute_topk=None):
            probs, top = default_compute_topk(scores, topk, num_groups=num_groups,
                                              group_topk=group_topk)
            action = self.router_replay_action
            if action is None:
                return probs, top
            if action == RouterReplayAction.RECORD:
                self.record_indices(top)
            elif action == RouterReplayAction.REPLAY_BACKWARD:
                top = self.replay_backward_list.pop(0).to(scores.device)
            else:
                raise ValueError(f"router replay action {action} is not used by lsp")
            return scores.gather(1, top), top

    replay = CheckpointRouterReplay()
    RouterReplay.global_router_replay_instances.remove(replay)
    return replay


class MoEFFN(nn.Module):
    """megatron-core ``MoELayer`` (alltoall dispatcher) with explicit auxiliary loss.

    Args:
        hidden_size; num_experts (divisible by EP); topk; ffn_hidden_size: per expert;
        shared_expert_size: width of an always-on shared expert (``None``: none);
        aux_loss_coeff; grouped_gemm: megatron ``GroupedMLP`` experts (GPU only);
        capacity_factor: ``None`` dropless (exact; a host sync per layer), else megatron's
            drop-and-pad dispatch at this capacity factor, in ``(0, num_experts / topk]``
            (no host sync; the upper end drops nothing; see the module doc);
        ctx: layout (a topology is required: megatron's MoE needs process groups).
    """

    def __init__(self, hidden_size: int, num_experts: int, topk: int, ffn_hidden_size: int,
                 ctx: ParallelContext, *, shared_expert_size: int | None = None,
                 aux_loss_coeff: float = 0.01, grouped_gemm: bool = False,
                 capacity_factor: float | None = None,
                 init_std: float = 0.02, num_layers: int = 1):
        super().__init__()
        from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
        from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
        from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
        from megatron.core.transformer.spec_utils import ModuleSpec

        if ctx is None or ctx.topo is None:
            raise ValueError(
                "MoEFFN needs a topology: megatron's MoE layer works on process groups; call "
                "lsp.parallel.topology.init_topology() first (one gloo rank is enough)"
            )
        ep = ctx.topo.ep
        if num_experts % ep:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size ep={ep}; "
                f"choose ep dividing {num_experts}"
            )
        if not 1 <= topk <= num_experts:
            raise ValueError(f"moe topk={topk} must lie in [1, num_experts={num_experts}]")
        if capacity_factor is not None and not 0 < capacity_factor <= num_experts / topk:
            # above num_experts / topk the capacity exceeds the tokens, which megatron's padded
            # permute cannot fill
            raise ValueError(
                f"moe capacity_factor={capacity_factor} must lie in (0, num_experts / topk = "
                f"{num_experts / topk:g}] ({num_experts / topk:g}: no token dropped), or be "
                f"None for dropless dispatch"
            )
        if grouped_gemm and not grouped_gemm_available():
            raise ValueError(
                "grouped_gemm=True needs CUDA and megatron's grouped GEMM (pip install "
                "grouped_gemm); set grouped_gemm=False to use SequentialMLP experts"
            )
        cfg = transformer_config(
            ctx, hidden_size, ffn_hidden_size, num_experts=num_experts, moe_topk=topk,
            moe_ffn_hidden_size=ffn_hidden_size, moe_shared_expert_size=shared_expert_size,
            moe_aux_loss_coeff=aux_loss_coeff, grouped_gemm=grouped_gemm,
            moe_capacity_factor=capacity_factor,
        )
        experts = (ModuleSpec(module=GroupedMLP) if grouped_gemm
                   else ModuleSpec(module=SequentialMLP, submodules=_mlp_spec()))
        shared = ModuleSpec(module=SharedExpertMLP, submodules=_mlp_spec()) if shared_expert_size else None
        spec = MoESubmodules(experts=experts, shared_experts=shared, router=_router_class())
        self.moe = MoELayer(cfg, spec, layer_number=1, pg_collection=ctx.topo.pg_collection)
        # activation checkpointing routes the recomputation as the forward did through this
        # (lsp.train.loop.replay_routing); with no replay action set it routes as usual
        self.moe.router.router_replay = checkpoint_routing_replay()
        # megatron's router GEMM is a custom autograd Function that is not autocast-aware (its
        # backward would multiply a bf16 gradient by the fp32 weight): run the router outside
        # autocast, in the residual stream's dtype (fp32 master weights and activations).
        router_forward = self.moe.router.forward

        def _router_no_autocast(*a, **kw):
            with torch.autocast("cuda", enabled=False):
                return router_forward(*a, **kw)

        self.moe.router.forward = _router_no_autocast
        _set_inits(self.moe, init_std, num_layers)
        n_local = num_experts // ep
        offset = ctx.topo.ep_rank * n_local
        for name, p in self.moe.experts.named_parameters():
            p.allreduce = False  # expert parameter: reduced over the expert-data-parallel group
            m = re.match(r"local_experts\.(\d+)\.", name)
            if m:  # SequentialMLP: initialise by the global expert index (layout-independent)
                p.lsp_expert_index = (int(m.group(1)), offset + int(m.group(1)))
            else:  # GroupedMLP: all local experts in one tensor
                p.lsp_grouped_experts = (offset, n_local)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        router = self.moe.router
        router.aux_loss = None
        out, _ = self.moe(x.contiguous())
        aux, router.aux_loss = router.aux_loss, None
        release_graph_refs(self.moe.token_dispatcher, router)
        return out, aux


def release_graph_refs(*objects) -> None:
    """Drop tensors with autograd history that megatron's dispatcher and router keep as attributes
    after a forward (e.g. the alltoall dispatcher's ``self.probs``).

    Such an attribute keeps the whole graph of the layer's last forward alive. Under activation
    checkpointing that is the graph of the *recomputation*, so every block's recomputed
    activations stayed alive until the next step's forward overwrote the attribute, and
    checkpointing saved no memory. The forward sets them again before use, and backward does
    not read them (autograd holds what it needs).
    """
    for obj in objects:
        for name, val in list(vars(obj).items()):
            if isinstance(val, Tensor) and not isinstance(val, nn.Parameter) and (
                    val.requires_grad or val.grad_fn is not None):
                setattr(obj, name, None)
