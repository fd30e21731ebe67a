"""Activation checkpointing of the decoder's blocks (``parallel.activation_checkpointing``).

Each block is recomputed in backward instead of keeping its activations; softmax attention
outputs can be kept (selective checkpointing), block inputs can wait in host memory, and MoE
routers replay the forward's choice in the recomputation.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def attention_ops():
    aten = torch.ops.aten
    return {getattr(aten, n).default for n in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
        if hasattr(aten, n)}


def _save_attention_context():
    """Selective checkpointing (torch's SAC): keep the softmax attention kernel's outputs (output
    and log-sum-exp, ~1 GB per layer at 512K tokens a GPU) and recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = attention_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _offload_hooks():
    """Saved-tensor hooks that move what they save to host memory (pinned on CUDA)."""
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def _offloaded_checkpoint(fn, x, cu_seqlens=None):
    """torch's reentrant checkpoint keeps its input through ``save_for_backward``, so the
    offload hooks move it to host memory until the block's backward brings it back; the block
    itself runs without saving anything in forward."""
    with _offload_hooks():
        return checkpoint(fn, x, cu_seqlens, use_reentrant=True)


def replay_routing(fn, replays):
    """``fn`` (a block's forward) wrapped for checkpointing: a fresh function per call that
    records each MoE router's top-k choice when first run and replays it when run again (the
    recomputation in backward), through megatron-core's ``RouterReplay``.

    Without it the recomputation chooses experts anew, and a near tie that an ulp of difference
    flips (1M tokens x 8 experts has many) changes the tokens per expert: torch's checkpoint
    then fails with "Recomputed values ... have different metadata", and a reentrant
    checkpoint would silently backpropagate through a routing the forward never used. The
    replay keeps the forward's experts; their
    weights are recomputed from the router's logits as usual (``lsp.layers.ffn.
    checkpoint_routing_replay``).
    """
    from megatron.core.transformer.moe.router_replay import RouterReplayAction as Act

    def fresh():
        recorded = []

        def run(x, cu_seqlens=None):  # cu_seqlens: packed documents (DecoderLM.forward)
            again = bool(recorded)
            for i, r in enumerate(replays):
                r.clear_indices()
                if again:
                    r.set_target_indices(recorded[i])
                r.set_router_replay_action(Act.REPLAY_BACKWARD if again else Act.RECORD)
            try:
                out = fn(x, cu_seqlens)
                if not again:
                    recorded.extend(r.get_recorded_indices() for r in replays)
            finally:
                for r in replays:
                    r.clear_indices()
                    r.clear_router_replay_action()
            return out

        return run

    return fresh


def apply_activation_checkpointing(model, save_attention: bool = True,
                                   offload: bool = False) -> None:
    """Recompute each block in backward instead of keeping its activations (from outside).

    ``early_stop=False``: the recomputation runs the whole block, so that code after the last
    saved tensor (``MoEFFN`` dropping the graph references megatron's dispatcher keeps) runs too;
    with early stop the recomputed graph of every block stayed alive to the end of the step.
    ``save_attention``: in softmax-attention blocks keep the attention kernel's outputs rather
    than run it again: at long context it is the most expensive op of the model (quadratic), and
    recomputing it cost one more attention forward per layer and step.
    ``offload``: keep each block's input (what checkpointing retains: 1 GB per block at 512K
    tokens and hidden 1024 in bf16) in host memory, copied back for the block's backward; the
    blocks whose attention outputs are kept stay on the device.

    Blocks with MoE feed-forwards replay the forward's routing in the recomputation
    (:func:`replay_routing`).
    """
    from lsp.layers import SoftmaxAttention
    from lsp.layers.ffn import MoEFFN

    for block in model.blocks:
        # a block without MoE gets an empty list: nothing to record or replay
        replays = [m.moe.router.router_replay for m in block.modules() if isinstance(m, MoEFFN)]
        fresh = replay_routing(block.forward, replays)
        keep_attention = save_attention and isinstance(block.mixer, SoftmaxAttention)
        if offload and not keep_attention:
            block.forward = lambda x, cu=None, _n=fresh: _offloaded_checkpoint(_n(), x, cu)
            continue
        kw = dict(use_reentrant=False, early_stop=False)
        if keep_attention:
            kw["context_fn"] = _save_attention_context
        block.forward = lambda x, cu=None, _n=fresh, _kw=kw: checkpoint(_n(), x, cu, **_kw)
