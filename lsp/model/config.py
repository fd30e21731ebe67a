"""The decoder's configuration and its validation against a parallel layout."""

from __future__ import annotations

from dataclasses import dataclass, fields

from lsp.layers.common import FEATURE_MAPS
from lsp.layers.context import local_heads
from lsp.layers.conv import CONV_BACKENDS
from lsp.layers.linear_attention import DECAYS, QK_NORMS
from lsp.layers.symbols import Symbols
from lsp.parallel.cp_attention import BACKENDS as ATTENTION_BACKENDS

__all__ = ["ModelConfig", "MIXER_LETTERS", "FFN_LETTERS", "check_sequence"]

MIXER_LETTERS = Symbols.MIXERS
FFN_LETTERS = Symbols.FFNS


@dataclass
class ModelConfig:
    """A hybrid decoder: one token mixer per letter of ``pattern``, one FFN per letter of
    ``ffn_pattern`` (``E`` MoE, ``F`` dense, ``-`` none; default all ``E`` when
    ``num_experts > 0`` else all ``F``); the letters are ``lsp.layers.Symbols``.

    Mixer letters: ``L`` LinearAttention, ``D`` DeltaNet, ``G`` GatedDeltaNet, ``M``
    MixtureOfMemories, ``S`` SoftmaxAttention.

    A ``ModelConfig`` is valid by construction (``__post_init__`` raises ``ValueError`` naming
    the value and the fix); :meth:`check_layout` checks it against a parallel layout.
    """

    vocab_size: int | None = 256  # None only to report a missing data.vocab_size clearly
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
        return (Symbols.MOE if self.num_experts else Symbols.DENSE_FFN) * self.num_layers

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def __post_init__(self):
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"model.vocab_size={self.vocab_size!r}; set it (or data.vocab_size, "
                             "which it takes by default) to the tokenizer's vocabulary size")
        if not self.pattern:
            raise ValueError("pattern is empty: give one mixer letter per layer, e.g. 'GGGS'")
        for i, letter in enumerate(self.pattern):
            if letter not in Symbols.MIXERS:
                known = ", ".join(f"{k}={v}" for k, v in Symbols.MIXERS.items())
                raise ValueError(
                    f"unknown mixer letter {letter!r} at position {i} of pattern "
                    f"{self.pattern!r}; use one of {known}"
                )
        kinds = self.ffn_kinds()
        if len(kinds) != self.num_layers:
            raise ValueError(
                f"ffn_pattern {kinds!r} has {len(kinds)} letters but pattern {self.pattern!r} "
                f"has {self.num_layers}; give one FFN letter per layer"
            )
        for i, letter in enumerate(kinds):
            if letter not in Symbols.FFNS:
                known = ", ".join(f"{k}={v}" for k, v in Symbols.FFNS.items())
                raise ValueError(
                    f"unknown FFN letter {letter!r} at position {i} of ffn_pattern {kinds!r}; "
                    f"use one of {known}"
                )
        for name in ("hidden_size", "num_heads", "head_dim", "ffn_hidden_size", "conv_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; it must be an integer >= 1")
        if Symbols.MOE in kinds:
            if self.num_experts <= 0:
                raise ValueError(
                    f"ffn_pattern {kinds!r} asks for MoE layers but num_experts="
                    f"{self.num_experts}; set num_experts > 0 or use 'F' layers"
                )
            if not 1 <= self.moe_topk <= self.num_experts:
                raise ValueError(f"moe_topk={self.moe_topk} must lie in [1, num_experts="
                                 f"{self.num_experts}]")
        for name, value, choices in (("la_decay", self.la_decay, DECAYS),
                                     ("la_feature_map", self.la_feature_map, FEATURE_MAPS),
                                     ("la_qk_norm", self.la_qk_norm, QK_NORMS),
                                     ("conv_backend", self.conv_backend, CONV_BACKENDS)):
            if value not in choices:
                raise ValueError(f"{name}={value!r}: use one of {choices}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}: use one of "
                             f"{ATTENTION_BACKENDS} (auto: cuDNN where torch has it, else flash; "
                             "math on the CPU)")
        if (Symbols.MIXTURE_OF_MEMORIES in self.pattern
                and not 1 <= self.mom_topk <= self.mom_num_memories):
            raise ValueError(f"mom_topk={self.mom_topk} must lie in [1, mom_num_memories="
                             f"{self.mom_num_memories}]")
        if Symbols.SOFTMAX_ATTENTION in self.pattern and self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads={self.kv_heads} must divide num_heads={self.num_heads}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def check_layout(self, tp: int = 1, cp: int = 1, ep: int = 1,
                     seq_length: int | None = None) -> None:
        """Raise ``ValueError`` (value and fix) when this model cannot run under the layout.

        Purely local: call it before any collective (``DecoderLM`` does, and the launcher before
        any process starts).
        """
        local_heads(self.num_heads, tp)
        if Symbols.SOFTMAX_ATTENTION in self.pattern:
            local_heads(self.kv_heads, tp, "num_kv_heads")
        if self.vocab_size % tp:
            raise ValueError(
                f"vocab_size={self.vocab_size} is not divisible by tp={tp}; the vocabulary is "
                f"split over TP ranks, so pad it to a multiple of {tp}"
            )
        for name, width in (("ffn_hidden_size", self.ffn_hidden_size),
                            ("moe_shared_expert_size", self.moe_shared_expert_size or 0)):
            if width % tp:
                raise ValueError(f"{name}={width} is not divisible by tp={tp}")
        if Symbols.MOE in self.ffn_kinds() and self.num_experts % ep:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by the expert-parallel size "
                f"ep={ep}; choose ep dividing {self.num_experts} (or more experts)"
            )
        if seq_length is not None:
            check_sequence(seq_length, tp, cp, self)


def check_sequence(seq_length: int, tp: int, cp: int, cfg: ModelConfig | None = None) -> None:
    """The global sequence length must split into ``cp`` contiguous shards of ``tp`` parts."""
    if seq_length % (cp * tp):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by cp*tp = {cp}*{tp} = {cp * tp}; "
            f"each CP rank holds a contiguous shard that TP splits again, so use a length that "
            f"is a multiple of {cp * tp}"
        )
    if cfg is not None and cp > 1 and cfg.use_short_conv and set(cfg.pattern) & Symbols.RECURRENT:
        need = cfg.conv_size - 1
        if seq_length // cp < need:
            raise ValueError(
                f"sequence length {seq_length} over cp={cp} gives {seq_length // cp} tokens per "
                f"rank, fewer than the {need} that the short convolution reads from the previous "
                f"rank; use a longer sequence or fewer CP ranks"
            )
