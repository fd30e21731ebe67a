"""The decoder's configuration and its validation against a parallel layout."""

from __future__ import annotations

from dataclasses import dataclass, fields

from lsp.layers.common import FEATURE_MAPS
from lsp.layers.conv import CONV_BACKENDS
from lsp.layers.context import SP_METHODS
from lsp.layers.linear_attention import DECAYS, QK_NORMS
from lsp.parallel.cp_attention import BACKENDS as ATTENTION_BACKENDS

__all__ = ["ModelConfig", "MIXER_LETTERS", "FFN_LETTERS", "check_config"]

MIXER_LETTERS = {
    "L": "LinearAttention",
    "D": "DeltaNet",
    "G": "GatedDeltaNet",
    "M": "MixtureOfMemories",
    "S": "SoftmaxAttention",
}
FFN_LETTERS = {"E": "MoE", "F": "dense SwiGLU", "-": "none"}


@dataclass
class ModelConfig:
    """A hybrid decoder: one token mixer per letter of ``pattern``, one FFN per letter of
    ``ffn_pattern`` (``E`` MoE, ``F`` dense, ``-`` none; default all ``E`` when
    ``num_experts > 0`` else all ``F``).

    Mixer letters: ``L`` LinearAttention, ``D`` DeltaNet, ``G`` GatedDeltaNet, ``M``
    MixtureOfMemories, ``S`` SoftmaxAttention.
    """

    vocab_size: int = 256
    hidden_size: int = 256
    pattern: str = "GGGS"
    ffn_pattern: str | None = None
    num_heads: int = 4
    head_dim: int = 64
    expand_v: float = 1.0
    use_short_conv: bool = True
    conv_size: int = 4
    norm_eps: float = 1e-5
    # LinearAttention ('L')
    la_decay: str = "key"
    la_feature_map: str = "identity"
    la_qk_norm: str = "none"
    la_output_gate: bool = True
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    # DeltaNet ('D') output gate; Gated DeltaNet and MoM always gate their output
    deltanet_output_gate: bool = False
    # MixtureOfMemories ('M')
    mom_num_memories: int = 4
    mom_topk: int = 2
    mom_shared_memory: bool = True
    mom_aux_loss_coeff: float = 0.01
    mom_memory_checkpointing: bool = False  # one memory at a time, each checkpointed (long context)
    mom_routed: bool = False  # each memory over its routed tokens only (one host sync per layer)
    conv_checkpointing: bool = False  # short convolutions keep only their input (long context)
    conv_backend: str = "torch"  # short convolutions: torch (conv1d) | triton (lsp.kernels.conv, [B,T,C] in place)
    # SoftmaxAttention ('S')
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    attention_backend: str = "auto"  # auto | cudnn | flash | math (cp_attention.resolve_backend)
    # feed-forward
    ffn_hidden_size: int = 512
    num_experts: int = 0
    moe_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_size: int | None = None
    moe_aux_loss_coeff: float = 0.01
    moe_grouped_gemm: bool = False
    moe_capacity_factor: float | None = None  # None: dropless; else drop-and-pad, no host sync
    # residual stream: float32 under bf16 autocast (default), or in the autocast dtype as in
    # Megatron-LM without --fp32-residual-connection (halves the activations that checkpointing
    # keeps: 2 bytes per token and hidden unit per block)
    fp32_residual_connection: bool = True
    # embeddings and initialisation
    tie_embeddings: bool = False
    init_std: float = 0.02
    seed: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    def ffn_kinds(self) -> str:
        if self.ffn_pattern is not None:
            return self.ffn_pattern
        return ("E" if self.num_experts else "F") * self.num_layers

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(names)}")
        return cls(**d)


def check_config(cfg: ModelConfig, tp: int = 1, cp: int = 1, ep: int = 1,
                 seq_length: int | None = None, sp_method: str = "allscan") -> None:
    """Raise ``ValueError`` (value and fix) for a config that cannot run under this layout.

    Purely local: call it before any collective (``DecoderLM`` does, and ``split_batch`` checks
    the sequence length).
    """
    if not cfg.pattern:
        raise ValueError("pattern is empty: give one mixer letter per layer, e.g. 'GGGS'")
    for i, letter in enumerate(cfg.pattern):
        if letter not in MIXER_LETTERS:
            known = ", ".join(f"{k}={v}" for k, v in MIXER_LETTERS.items())
            raise ValueError(
                f"unknown mixer letter {letter!r} at position {i} of pattern {cfg.pattern!r}; "
                f"use one of {known}"
            )
    kinds = cfg.ffn_kinds()
    if len(kinds) != cfg.num_layers:
        raise ValueError(
            f"ffn_pattern {kinds!r} has {len(kinds)} letters but pattern {cfg.pattern!r} has "
            f"{cfg.num_layers}; give one FFN letter per layer"
        )
    for i, letter in enumerate(kinds):
        if letter not in FFN_LETTERS:
            known = ", ".join(f"{k}={v}" for k, v in FFN_LETTERS.items())
            raise ValueError(
                f"unknown FFN letter {letter!r} at position {i} of ffn_pattern {kinds!r}; "
                f"use one of {known}"
            )
    if "E" in kinds and cfg.num_experts <= 0:
        raise ValueError(
            f"ffn_pattern {kinds!r} asks for MoE layers but num_experts={cfg.num_experts}; "
            f"set num_experts > 0 or use 'F' layers"
        )
    if sp_method not in SP_METHODS:
        raise ValueError(f"sp_method={sp_method!r}: use one of {SP_METHODS}")
    if cfg.la_decay not in DECAYS:
        raise ValueError(f"la_decay={cfg.la_decay!r}: use one of {DECAYS}")
    if cfg.la_feature_map not in FEATURE_MAPS:
        raise ValueError(f"la_feature_map={cfg.la_feature_map!r}: use one of {FEATURE_MAPS}")
    if cfg.la_qk_norm not in QK_NORMS:
        raise ValueError(f"la_qk_norm={cfg.la_qk_norm!r}: use one of {QK_NORMS}")
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={cfg.attention_backend!r}: use one of "
                         f"{ATTENTION_BACKENDS} (auto: cuDNN where torch has it, else flash; "
                         f"math on the CPU)")
    if cfg.conv_backend not in CONV_BACKENDS:
        raise ValueError(f"conv_backend={cfg.conv_backend!r}: use one of {CONV_BACKENDS}")

    if cfg.num_heads % tp:
        raise ValueError(
            f"num_heads={cfg.num_heads} is not divisible by tp={tp}; heads are split over TP "
            f"ranks, so choose tp dividing {cfg.num_heads} (or a head count divisible by {tp})"
        )
    kv = cfg.num_kv_heads or cfg.num_heads
    if "S" in cfg.pattern:
        if cfg.num_heads % kv:
            raise ValueError(f"num_kv_heads={kv} must divide num_heads={cfg.num_heads}")
        if kv % tp:
            raise ValueError(
                f"num_kv_heads={kv} is not divisible by tp={tp}; choose tp dividing {kv}"
            )
    if cfg.vocab_size % tp:
        raise ValueError(
            f"vocab_size={cfg.vocab_size} is not divisible by tp={tp}; the vocabulary is split "
            f"over TP ranks, so pad it to a multiple of {tp}"
        )
    for name, width in (("ffn_hidden_size", cfg.ffn_hidden_size),
                        ("moe_shared_expert_size", cfg.moe_shared_expert_size or 0)):
        if width % tp:
            raise ValueError(f"{name}={width} is not divisible by tp={tp}")
    if "E" in kinds:
        if cfg.num_experts % ep:
            raise ValueError(
                f"num_experts={cfg.num_experts} is not divisible by the expert-parallel size "
                f"ep={ep}; choose ep dividing {cfg.num_experts} (or more experts)"
            )
        if not 1 <= cfg.moe_topk <= cfg.num_experts:
            raise ValueError(f"moe_topk={cfg.moe_topk} must lie in [1, num_experts={cfg.num_experts}]")
    if "M" in cfg.pattern and not 1 <= cfg.mom_topk <= cfg.mom_num_memories:
        raise ValueError(
            f"mom_topk={cfg.mom_topk} must lie in [1, mom_num_memories={cfg.mom_num_memories}]"
        )
    if seq_length is not None:
        check_sequence(seq_length, tp, cp, cfg)


def check_sequence(seq_length: int, tp: int, cp: int, cfg: ModelConfig | None = None) -> None:
    """The global sequence length must split into ``cp`` contiguous shards of ``tp`` parts."""
    if seq_length % (cp * tp):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by cp*tp = {cp}*{tp} = {cp * tp}; "
            f"each CP rank holds a contiguous shard that TP splits again, so use a length that "
            f"is a multiple of {cp * tp}"
        )
    if cfg is not None and cp > 1 and cfg.use_short_conv and set(cfg.pattern) & set("LDGM"):
        need = cfg.conv_size - 1
        if seq_length // cp < need:
            raise ValueError(
                f"sequence length {seq_length} over cp={cp} gives {seq_length // cp} tokens per "
                f"rank, fewer than the {need} that the short convolution reads from the previous "
                f"rank; use a longer sequence or fewer CP ranks"
            )
