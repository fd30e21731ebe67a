"""The hybrid decoder LM: embedding, pre-norm blocks (token mixer + FFN) from a pattern string,
final RMSNorm, tied or untied output head, and a loss that each CP rank computes on its slice.

Layout: the model reads this rank's tokens ``[B_local, T / cp]`` (DP splits the batch, CP the
sequence into contiguous shards in CP-rank order; :func:`split_batch` cuts them). Inside, the
residual stream is megatron's ``[T / (cp * tp), B_local, D]``: sequence-sharded over TP when
TP > 1.

Loss convention: ``out.loss`` is this rank's share; the global loss is the sum of the shares
over DP x CP (``lm`` part, identical on TP ranks) plus the MoE/MoM balancing losses, whose
shares are spread over all ranks. Back-propagate ``out.loss`` on every rank and sum gradients
with ``lsp.parallel.grads.reduce_gradients``: the result is the gradient of

    loss = sum(CE over all tokens) / (number of tokens) + sum over layers of aux losses

(aux losses per sequence, averaged over the global batch), whatever the layout.
``out.lm_loss`` and ``out.aux_loss`` are the global values (detached, reduced over ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lsp.layers import MIXERS, DenseFFN, MoEFFN, ParallelContext, RMSNorm, Symbols, init_parameters
from lsp.layers.common import wide
from lsp.layers.context import ColumnLinear, normal_init
from lsp.model.config import ModelConfig, check_sequence

__all__ = ["DecoderLM", "Block", "LMOutput", "split_batch", "build_mixer"]


@dataclass
class LMOutput:
    """``loss``: this rank's share (back-propagate it); ``lm_loss``/``aux_loss``: global values
    (detached); ``logits``: ``[T / cp, B, V / tp]`` vocab-parallel logits when no labels given."""

    loss: Tensor | None
    lm_loss: Tensor | None
    aux_loss: Tensor | None
    logits: Tensor | None = None


def _recurrent(cfg: ModelConfig) -> dict:
    """Keywords every recurrent mixer takes from the config."""
    return dict(expand_v=cfg.expand_v, use_short_conv=cfg.use_short_conv,
                conv_size=cfg.conv_size, conv_backend=cfg.conv_backend,
                conv_recompute=cfg.conv_checkpointing, norm_eps=cfg.norm_eps)


# Per pattern letter, the mixer's own keywords from the config.
_MIXER_KWARGS = {
    Symbols.LINEAR_ATTENTION: lambda cfg: dict(
        decay=cfg.la_decay, feature_map=cfg.la_feature_map, qk_norm=cfg.la_qk_norm,
        use_output_gate=cfg.la_output_gate, gate_low_rank_dim=cfg.gate_low_rank_dim,
        gate_logit_normalizer=cfg.gate_logit_normalizer, **_recurrent(cfg)),
    Symbols.DELTANET: lambda cfg: dict(use_output_gate=cfg.deltanet_output_gate,
                                       **_recurrent(cfg)),
    Symbols.GATED_DELTANET: lambda cfg: dict(use_output_gate=True, **_recurrent(cfg)),
    Symbols.MIXTURE_OF_MEMORIES: lambda cfg: dict(
        num_memories=cfg.mom_num_memories, topk=cfg.mom_topk,
        shared_memory=cfg.mom_shared_memory, aux_loss_coeff=cfg.mom_aux_loss_coeff,
        memory_checkpointing=cfg.mom_memory_checkpointing, routed=cfg.mom_routed,
        **_recurrent(cfg)),
    Symbols.SOFTMAX_ATTENTION: lambda cfg: dict(num_kv_heads=cfg.num_kv_heads,
                                                rope_theta=cfg.rope_theta,
                                                attention_backend=cfg.attention_backend),
}


def build_mixer(letter: str, cfg: ModelConfig, ctx: ParallelContext) -> nn.Module:
    """The token mixer for one pattern letter (``lsp.layers.Symbols``)."""
    return MIXERS[letter](cfg.hidden_size, cfg.num_heads, cfg.head_dim, ctx=ctx,
                          init_std=cfg.init_std, num_layers=cfg.num_layers,
                          **_MIXER_KWARGS[letter](cfg))


class Block(nn.Module):
    """``h = x + mixer(norm(x)); out = h + ffn(norm(h))`` (pre-norm)."""

    def __init__(self, letter: str, ffn_kind: str, cfg: ModelConfig, ctx: ParallelContext,
                 index: int = 0):
        super().__init__()
        self.label = f"block{index}_{letter}{ffn_kind}"  # a profiler range name
        self.mixer_norm = RMSNorm(cfg.hidden_size, ctx, cfg.norm_eps)
        self.mixer = build_mixer(letter, cfg, ctx)
        self.ffn_norm = self.ffn = None
        common = dict(init_std=cfg.init_std, num_layers=cfg.num_layers)
        if ffn_kind == Symbols.DENSE_FFN:
            self.ffn_norm = RMSNorm(cfg.hidden_size, ctx, cfg.norm_eps)
            self.ffn = DenseFFN(cfg.hidden_size, cfg.ffn_hidden_size, ctx, **common)
        elif ffn_kind == Symbols.MOE:
            self.ffn_norm = RMSNorm(cfg.hidden_size, ctx, cfg.norm_eps)
            self.ffn = MoEFFN(cfg.hidden_size, cfg.num_experts, cfg.moe_topk,
                              cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size, ctx,
                              shared_expert_size=cfg.moe_shared_expert_size,
                              aux_loss_coeff=cfg.moe_aux_loss_coeff,
                              grouped_gemm=cfg.moe_grouped_gemm,
                              capacity_factor=cfg.moe_capacity_factor, **common)

    def forward(self, x: Tensor, cu_seqlens=None) -> tuple[Tensor, Tensor | None]:
        with torch.profiler.record_function(self.label):
            return self._forward(x, cu_seqlens)

    def _forward(self, x: Tensor, cu_seqlens=None) -> tuple[Tensor, Tensor | None]:
        # packed documents reach the token mixer only: the FFN (dense or MoE) keeps no state
        y, aux = (self.mixer(self.mixer_norm(x)) if cu_seqlens is None
                  else self.mixer(self.mixer_norm(x), cu_seqlens=cu_seqlens))
        x = x + y
        if self.ffn is not None:
            y, aux_ffn = self.ffn(self.ffn_norm(x))
            x = x + y
            if aux_ffn is not None:
                aux = aux_ffn if aux is None else aux + aux_ffn
        return x, aux


def _embedding_class():
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    class Embedding(VocabParallelEmbedding):
        """megatron's vocab-parallel embedding; returns ``[T / tp, B, D]`` (reduce-scattered over
        TP, or transposed at TP 1); a plain lookup when there is no process group."""

        def forward(self, ids: Tensor) -> Tensor:
            if self.tp_group is None:
                return F.embedding(ids, self.weight).transpose(0, 1).contiguous()
            out = super().forward(ids)
            return out if self.reduce_scatter_embeddings else out.transpose(0, 1).contiguous()

    return Embedding


class DecoderLM(nn.Module):
    """Hybrid decoder LM (see the module docstring for layout and loss).

    Args:
        cfg: :class:`ModelConfig`; ctx: the layout (default: one process, no process group);
        seed: initialisation seed (default ``cfg.seed``); weights are identical for a seed
        whatever the layout.
    """

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None, seed: int | None = None):
        super().__init__()
        self.ctx = ctx = ctx or ParallelContext()
        cfg.check_layout(tp=ctx.tp_size, cp=ctx.cp_size, ep=1 if ctx.topo is None else ctx.topo.ep)
        if ctx.tp_size > 1:
            from megatron.core import parallel_state as ps

            if ps.get_tensor_model_parallel_group(check_initialized=False) is not ctx.tp_group:
                raise ValueError(
                    "the topology's TP group is not megatron's parallel_state TP group (the "
                    "vocab-parallel loss uses the latter): build it with init_topology()"
                )
        self.cfg = cfg
        init = normal_init(cfg.init_std)
        self.embedding = _embedding_class()(
            cfg.vocab_size, cfg.hidden_size, init_method=lambda w: None,
            reduce_scatter_embeddings=ctx.sequence_parallel, config=ctx.linear_config(True),
            tp_group=ctx.tp_group,
        )
        self.embedding.weight.lsp_init = init
        self.blocks = nn.ModuleList(
            Block(letter, kind, cfg, ctx, i)
            for i, (letter, kind) in enumerate(zip(cfg.pattern, cfg.ffn_kinds()))
        )
        self.final_norm = RMSNorm(cfg.hidden_size, ctx, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else ColumnLinear(
            cfg.hidden_size, cfg.vocab_size, ctx, init=init)
        for p in self.parameters():  # whole on every TP rank => gradient summed over TP
            if not getattr(p, "tensor_model_parallel", False) and getattr(p, "allreduce", True):
                p.sequence_parallel = True
        init_parameters(self, cfg.seed if seed is None else seed, ctx.tp_size, ctx.tp_rank)

    def output_weight(self) -> Tensor:
        """This TP rank's vocabulary rows of the output head ``[V / tp, D]``."""
        return self.embedding.weight if self.output is None else self.output.weight

    def forward(self, input_ids: Tensor, labels: Tensor | None = None,
                loss_mask: Tensor | None = None, cu_seqlens=None) -> LMOutput:
        """``input_ids``, ``labels``, ``loss_mask``: this rank's ``[B_local, T / cp]`` tokens,
        targets and (optional) 0/1 weights. ``cu_seqlens``: packed documents, the GLOBAL
        offsets of each row's whole sequence (one 1-D tensor for ``B_local = 1``, else a list
        of ``B_local``; the same on every CP rank): every layer's state resets at each
        boundary and no token attends or convolves across one."""
        ctx = self.ctx
        B, T = input_ids.shape
        if T % ctx.tp_size:
            raise ValueError(
                f"this rank holds {T} tokens, not divisible by tp={ctx.tp_size}; use a sequence "
                f"length divisible by cp*tp = {ctx.cp_size * ctx.tp_size}"
            )
        h = self.embedding(input_ids)  # [T / tp, B, D]
        if not self.cfg.fp32_residual_connection and torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        if cu_seqlens is not None:
            from lsp.layers.context import document_rows

            document_rows(cu_seqlens, B)  # the named error before any layer runs
        aux = None
        for block in self.blocks:
            # one argument without documents: wrappers of block.forward (checkpointing) stay valid
            h, a = block(h) if cu_seqlens is None else block(h, cu_seqlens)
            if a is not None:
                aux = a if aux is None else aux + a
        h = self.final_norm(h)
        logits = F.linear(ctx.enter_tp(h), self.output_weight().to(h.dtype))  # [T, B, V / tp]
        if labels is None:
            return LMOutput(None, None, None, logits)
        per_token = self._cross_entropy(logits, labels.transpose(0, 1).contiguous())  # [T, B]
        if loss_mask is None:
            count = torch.tensor(float(B * T * ctx.cp_size * ctx.dp_size), device=h.device)
            lm = per_token.sum() / count
        else:
            mask = loss_mask.transpose(0, 1).to(per_token.dtype)
            count = mask.sum().detach()
            if ctx.topo is not None:
                dist.all_reduce(count, group=ctx.topo.dp_cp_group)
            lm = (per_token * mask).sum() / count.clamp(min=1)
        aux_share = None if aux is None else aux / ctx.dp_size
        loss = lm if aux_share is None else lm + aux_share
        lm_total, aux_total = lm.detach().clone(), None if aux is None else aux_share.detach().clone()
        if ctx.topo is not None:
            dist.all_reduce(lm_total, group=ctx.topo.dp_cp_group)
            if aux_total is not None:
                dist.all_reduce(aux_total)  # shares over every rank (TP splits the tokens too)
        return LMOutput(loss, lm_total, aux_total, None)

    def _cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.ctx.tp_size == 1:
            V = logits.shape[-1]
            return F.cross_entropy(wide(logits).reshape(-1, V), target.reshape(-1),
                                   reduction="none").view(target.shape)
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(wide(logits), target)


def split_batch(x: Tensor, ctx: ParallelContext, cfg: ModelConfig | None = None) -> Tensor:
    """This rank's part of a global ``[B, T, ...]`` batch: rows of its DP rank, the contiguous
    sequence shard of its CP rank. Raises ``ValueError`` (before any collective) when the sizes
    do not divide."""
    B, T = x.shape[:2]
    dp = ctx.dp_size
    check_sequence(T, ctx.tp_size, ctx.cp_size, cfg)
    if B % dp:
        raise ValueError(
            f"batch size {B} is not divisible by the data-parallel size dp={dp}; use a multiple "
            f"of {dp}"
        )
    dp_rank = 0 if ctx.topo is None else ctx.topo.dp_rank
    b, t = B // dp, T // ctx.cp_size
    return x[dp_rank * b:(dp_rank + 1) * b, ctx.cp_rank * t:(ctx.cp_rank + 1) * t]
