"""The FLOP count behind the MFU figure, documented term by term.

Model FLOPs per token of one training step = 3 x forward FLOPs (backward ~ 2 x forward);
recomputation under activation checkpointing is not counted (the usual "model FLOPs"). With
``D`` hidden size, ``H`` heads, ``dk`` head dim, ``dv = dk * expand_v``, ``C = 64`` the chunk
size of the chunkwise kernels, ``T`` the global sequence length and ``V`` the vocabulary, the
forward FLOPs per token are (a multiply-add is 2 FLOPs):

- every linear map ``n_in -> n_out``: ``2 n_in n_out`` (projections, gates, FFN, LM head);
- linear attention core, per head: ``4 dk dv`` (state update ``k v^T`` and readout ``S^T q``)
  plus ``C (dk + dv)`` (the causal half of the intra-chunk ``Q K^T`` and ``A V``);
- delta-rule core, per head: ``8 dk dv + C (2 dk + dv)`` (also ``W S``, the WY solve's
  ``K K^T`` and the pseudo-values);
- Mixture-of-Memories: the delta-rule core and the memories' key/value/beta/decay projections
  for ``topk`` (+1 shared) memories per token; the router ``2 D M``. (The dense CPU/torch form
  computes all ``M`` memories; the count is the model's, so MFU understates utilisation there.)
- causal softmax attention, per head: ``T (dk + dk)`` (``Q K^T`` and ``A V`` over on average
  ``T / 2`` earlier tokens);
- dense SwiGLU FFN: ``6 D F``; MoE: ``topk`` experts of ``6 D F_e`` plus a shared expert and the
  router ``2 D E``.

Embedding lookups, norms, convolutions and element-wise gates are not counted.
"""

from __future__ import annotations

from lsp.layers.symbols import Symbols

CHUNK = 64

# Dense bf16 peak of the accelerator (TFLOP/s), for MFU. Vendor datasheet values (SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name, or None when unknown (e.g. CPU)."""
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return val
    return None


def forward_flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs per token of a ``lsp.model.ModelConfig`` at global length ``seq_len``."""
    D, H, dk = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    dv = int(dk * cfg.expand_v)
    C = CHUNK
    total = 2.0 * D * cfg.vocab_size  # LM head
    la_core = 4 * dk * dv + C * (dk + dv)
    dr_core = 8 * dk * dv + C * (2 * dk + dv)
    for letter, ffn in zip(cfg.pattern, cfg.ffn_kinds()):
        if letter == Symbols.LINEAR_ATTENTION:
            proj = 2 * D * (2 * H * dk + H * dv) + 2 * H * dv * D
            if cfg.la_decay == "key":
                proj += 2 * D * cfg.gate_low_rank_dim + 2 * cfg.gate_low_rank_dim * H * dk
            elif cfg.la_decay == "head":
                proj += 2 * D * H
            if cfg.la_output_gate:
                proj += 2 * D * H * dv
            total += proj + H * la_core
        elif letter in Symbols.DELTA_RULE:
            proj = 2 * D * (2 * H * dk + H * dv + H) + 2 * H * dv * D
            if letter == Symbols.GATED_DELTANET:
                proj += 2 * D * H + 2 * D * H * dv
            elif cfg.deltanet_output_gate:
                proj += 2 * D * H * dv
            total += proj + H * dr_core
        elif letter == Symbols.MIXTURE_OF_MEMORIES:
            active = cfg.mom_topk + (1 if cfg.mom_shared_memory else 0)
            per_mem = 2 * D * (H * dk + H * dv + 2 * H)
            proj = 2 * D * H * dk + active * per_mem + 2 * D * H * dv + 2 * H * dv * D
            total += proj + 2 * D * cfg.mom_num_memories + active * H * dr_core
        elif letter == Symbols.SOFTMAX_ATTENTION:
            kv = cfg.num_kv_heads or H
            proj = 2 * D * H * dk + 2 * 2 * D * kv * dk + 2 * H * dk * D
            total += proj + H * seq_len * (dk + dk)
        if ffn == Symbols.DENSE_FFN:
            total += 6 * D * cfg.ffn_hidden_size
        elif ffn == Symbols.MOE:
            Fe = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
            total += cfg.moe_topk * 6 * D * Fe + 2 * D * cfg.num_experts
            if cfg.moe_shared_expert_size:
                total += 6 * D * cfg.moe_shared_expert_size
    return total


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Model FLOPs per token of a training step (forward + backward)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)
