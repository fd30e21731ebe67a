"""The run's configuration: one typed dataclass per Hydra group, validated once.

``configs/`` holds the YAML groups (``model``, ``parallel``, ``data``, ``train``,
``experiment``); :func:`register_configs` registers :class:`RunConfig` with Hydra's ConfigStore
as the schema the root ``config.yaml`` starts from, so every YAML file and command-line override
is type-checked while Hydra composes. :func:`load_config` then turns the composed tree into a
``RunConfig`` whose ``__post_init__`` methods (and :meth:`RunConfig.resolve`, for what depends
on the number of ranks) raise ``ValueError`` naming the value and the fix. Nothing downstream
reads ``cfg.get(key, default)`` or validates again: processes receive the resolved object.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lsp.model.config import ModelConfig
from lsp.ops.common.validate import BACKENDS as OP_BACKENDS
from lsp.parallel.exchange import check_method

PRECISIONS = ("auto", "bf16", "fp32")
DIST_BACKENDS = ("auto", "nccl", "gloo")
DATA_KINDS = ("stdlib", "megatron", "mqar")


def _at_least(group: str, obj, minimum: float, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise ValueError(f"{group}.{name}={value!r}; it must be a number >= {minimum}")


def _one_of(group: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{group}.{name}={value!r} is unknown; choose one of {choices}")


@dataclass
class TrainConfig:
    """Optimisation, schedule and the intervals of the loop's collaborators."""

    steps: int = 100
    """Optimizer steps of the whole schedule."""
    stop_after_step: int | None = None
    """Stop early (e.g. to test resume) without changing the schedule."""
    micro_batch: int = 1
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch: int | None = None
    """Sequences per optimizer step; default ``micro_batch * dp`` (more gives accumulation)."""
    seq_len: int = 2048
    """Global sequence length (split over CP ranks)."""
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0: none)."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on GPU, fp32 on CPU), ``bf16`` or ``fp32``."""
    log_interval: int = 1
    eval_interval: int = 0
    """Evaluate every N steps and at the end (0: never)."""
    eval_batches: int = 2
    save_interval: int = 0
    """Checkpoint every N steps (0: never)."""
    keep_last: int = 2
    watchdog_s: float | None = None
    """Print every thread's stack when a step runs longer than this (finding hangs)."""
    profile_step: int | None = None
    """Profile this step (1-based) with torch.profiler into ``run_dir/profile_rank<r>.txt``."""
    resume: str = "auto"
    """``auto`` (latest checkpoint in run_dir), ``none``, or the path of a ``step_<N>`` folder."""

    def __post_init__(self):
        _at_least("train", self, 1, "steps", "micro_batch", "seq_len", "log_interval",
                  "eval_batches", "keep_last")
        _at_least("train", self, 1, "global_batch", "stop_after_step", "profile_step",
                  optional=True)
        _at_least("train", self, 0, "warmup_steps", "eval_interval", "save_interval",
                  "weight_decay", "clip_grad", "min_lr")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr={self.lr!r}; the learning rate must be a finite number > 0")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}; "
                             "the cosine schedule decays from lr to min_lr")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}; it must lie in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"train.eps={self.eps}; it must be > 0")
        if self.watchdog_s is not None and not self.watchdog_s > 0:
            raise ValueError(f"train.watchdog_s={self.watchdog_s}; use a number of seconds > 0 "
                             "or null")
        _one_of("train", "precision", self.precision, PRECISIONS)


@dataclass
class ParallelConfig:
    """The process layout: ``dp = world / (tp * cp)``, one process per GPU or CPU rank."""

    tp: int = 1
    """Tensor parallelism over heads."""
    cp: int = 1
    """Context (sequence) parallelism: contiguous shards in rank order."""
    ep: int = 1
    """Expert parallelism (divides the world size and the number of experts)."""
    sp_method: str = "allscan"
    """State exchange across CP ranks: ``allscan`` | ``allgather`` | ``ring``."""
    activation_checkpointing: bool = False
    checkpoint_save_attention: bool = True
    """With checkpointing: keep softmax attention outputs, recompute the rest."""
    offload_checkpoints: bool = False
    """With checkpointing: keep block inputs in host memory until their backward."""
    attention_load_balance: bool = False
    """CP: split softmax attention work evenly over the ranks (contiguous layout)."""
    attention_balance_overlap: bool = False
    """With the balance: exchange the moved rows alongside each rank's own blocks."""
    op_backend: str = "auto"
    """``lsp.ops`` backend: ``auto`` (Triton on CUDA) | ``torch`` | ``triton``."""
    dist_backend: str = "auto"
    """``nccl`` on GPUs, ``gloo`` on CPU."""
    nproc: int | None = None
    """Processes a plain ``lsp-train`` (no launcher) spawns; default ``tp * cp``."""
    timeout_s: float = 600
    """The job ends if a rank hangs for longer than this. With more than one rank it bounds
    every loop iteration (the step with its collectives, logging, evaluation and checkpoint)
    and the final barrier: a rank still inside one after ``timeout_s`` prints every thread's
    Python stack and exits with status 124, and the launcher ends the rest (lsp-train's own
    spawning SIGTERMs them, SIGKILL 3 s later; torchrun and mpirun stop a job whose rank exits
    non-zero). It is also the process group's timeout (start-up rendezvous, and NCCL collectives,
    which tear the process down on it). Set it above the slowest iteration, the first (compiling
    kernels) and checkpoint saves included: a legitimately slow one is ended too."""
    ablate_incoming_state: bool = False
    """Diagnostic: drop the recurrent state arriving from earlier CP ranks (wrong by design)."""

    def __post_init__(self):
        _at_least("parallel", self, 1, "tp", "cp", "ep")
        _at_least("parallel", self, 1, "nproc", optional=True)
        if not self.timeout_s > 0:
            raise ValueError(f"parallel.timeout_s={self.timeout_s}; use a number of seconds > 0")
        check_method(self.sp_method, "parallel.sp_method")
        _one_of("parallel", "op_backend", self.op_backend, OP_BACKENDS)
        _one_of("parallel", "dist_backend", self.dist_backend, DIST_BACKENDS)
        if self.attention_balance_overlap and not self.attention_load_balance:
            raise ValueError("parallel.attention_balance_overlap=true overlaps the balanced "
                             "attention's exchange; it needs parallel.attention_load_balance=true")


@dataclass
class DataConfig:
    """Where tokens come from; ``kind`` picks the source and the fields it reads."""

    kind: str = "stdlib"
    """``stdlib`` (bytes of Python's standard library), ``megatron`` (.bin/.idx) or ``mqar``."""
    vocab_size: int | None = 256
    path: str | None = None
    """megatron: prefix of the .bin/.idx pair, without extension."""
    valid_path: str | None = None
    """megatron: optional separate validation prefix."""
    valid_percent: float = 2.0
    """stdlib: share of the files held out for validation."""
    root: str | None = None
    """stdlib: the source folder (default: this interpreter's standard library)."""
    max_bytes: int | None = None
    """stdlib: read at most this many bytes (faster start for demos)."""
    num_pairs: int = 8
    """mqar: key-value pairs per sequence."""
    reset_state_at_document_boundaries: bool = True
    """stdlib, megatron: every layer's state starts afresh at each document (packed documents,
    ``cu_seqlens``); false lets it flow across documents as Megatron's GPT datasets do. The ops
    and short convolutions take document offsets on both backends. mqar samples are one
    document each: nothing to reset."""

    def __post_init__(self):
        _one_of("data", "kind", self.kind, DATA_KINDS)
        if self.kind == "megatron":
            if not self.path:
                raise ValueError("data.kind=megatron needs data.path=<prefix of a .bin/.idx pair>")
            for prefix in filter(None, (self.path, self.valid_path)):
                for ext in (".bin", ".idx"):
                    if not os.path.isfile(prefix + ext):
                        raise ValueError(f"data.path: {prefix + ext} does not exist; pass the "
                                         "prefix of a .bin/.idx pair made by megatron's "
                                         "tools/preprocess_data.py")
        if self.vocab_size is None:
            raise ValueError(f"data.kind={self.kind} needs data.vocab_size=<the tokenizer's "
                             "vocabulary size>")
        _at_least("data", self, 1, "vocab_size", "num_pairs")
        if not isinstance(self.reset_state_at_document_boundaries, bool):
            raise ValueError(f"data.reset_state_at_document_boundaries="
                             f"{self.reset_state_at_document_boundaries!r}; pass true or false")


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Write TensorBoard events beside ``metrics.jsonl``."""


@dataclass
class RunConfig:
    """One training run: the groups above plus its name, folder and seed."""

    name: str = "lsp"
    run_dir: str = "runs/${name}"
    seed: int = 1234
    log: LogConfig = field(default_factory=LogConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        m, p, t = self.model, self.parallel, self.train
        if m.vocab_size < self.data.vocab_size:
            raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the data's "
                             f"vocabulary {self.data.vocab_size}; raise model.vocab_size")
        m.check_layout(tp=p.tp, cp=p.cp, ep=p.ep, seq_length=t.seq_len)
        if m.conv_backend == "triton" and not self.on_gpu and os.environ.get(
                "TRITON_INTERPRET") != "1":
            raise ValueError("model.conv_backend=triton runs on GPUs (or under TRITON_INTERPRET=1); "
                             "this run is on CPU ranks: use model.conv_backend=torch")

    @property
    def on_gpu(self) -> bool:
        """The ranks run on GPUs (NCCL), as ``parallel.dist_backend`` resolves here."""
        return self.dist_backend == "nccl"

    @property
    def dist_backend(self) -> str:
        import torch

        b = self.parallel.dist_backend
        return b if b != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")

    def resolve(self, world: int) -> "RunLayout":
        """The layout for ``world`` ranks; raises ``ValueError`` when it cannot hold the run."""
        from lsp.parallel.topology import check_layout

        p, t = self.parallel, self.train
        dp = check_layout(world, p.tp, p.cp, p.ep)
        gbatch = t.global_batch or t.micro_batch * dp
        if gbatch % (t.micro_batch * dp):
            raise ValueError(f"train.global_batch={gbatch} is not divisible by micro_batch x dp = "
                             f"{t.micro_batch} x {dp}; choose a multiple of {t.micro_batch * dp}")
        return RunLayout(world, dp, gbatch, gbatch // (t.micro_batch * dp))

    def to_yaml(self) -> str:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.structured(self))


@dataclass(frozen=True)
class RunLayout:
    """What a run's configuration gives for a number of ranks."""

    world: int
    dp: int
    global_batch: int
    accum: int
    """Micro-batches per optimizer step on each data-parallel rank."""


SCHEMA = "lsp_run_schema"


def register_configs() -> None:
    """Register :class:`RunConfig` as Hydra's schema ``lsp_run_schema`` (``configs/config.yaml``
    lists it first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA, node=RunConfig)


def config_dir() -> str:
    return str(resources.files("lsp.configs"))


def compose(overrides: list[str]):
    """The composed, type-checked (not yet validated) Hydra tree for these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def load_config(overrides: list[str]) -> RunConfig:
    """The validated :class:`RunConfig` for command-line overrides (Hydra syntax)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose(overrides))


def check_run_dir(run_dir: str) -> None:
    """Create the run folder and prove it writable (before any process starts)."""
    import tempfile

    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ValueError(f"run_dir={run_dir} cannot be written ({e.strerror}); pick another "
                         "run_dir") from e


__all__ = ["RunConfig", "RunLayout", "ModelConfig", "ParallelConfig", "DataConfig",
           "TrainConfig", "LogConfig", "load_config", "compose", "register_configs"]
