"""A small CPU shim for megatron-core's direct ``torch.cuda`` calls (docs/design.md, Parallel
layout).

megatron-core's tensor-parallel linears, MoE token dispatchers and DDP are written for GPUs and
call ``torch.cuda`` directly even where the math is device-agnostic: buffers are allocated with
``device=torch.cuda.current_device()``, the all-to-all dispatcher copies split sizes to the host
on a side ``torch.cuda.Stream`` and waits on ``torch.cuda.Event``s, and dropout/initialisation
fork a CUDA RNG state through ``get_cuda_rng_tracker()``. On a CPU-only build of torch each of
those raises, so without help none of megatron's parallel modules can run on gloo.

``install()`` patches exactly these entry points, and only for a CPU run: when CUDA is
unavailable, or when forced for a gloo process group (CPU tensors on a GPU machine); on a GPU run
it is a no-op and megatron runs untouched:

==============================================  ==================================================
patched                                         CPU behaviour
==============================================  ==================================================
``torch.cuda.current_device()``                 returns ``torch.device("cpu")``, so megatron's
                                                allocations (``torch.empty(..., device=...)``) and
                                                ``.to(device=...)`` moves land on the CPU
``torch.cuda.Stream``, ``torch.cuda.Event``     do-nothing objects (``wait_stream``,
                                                ``record_event``, ``synchronize``, ``query``...):
                                                CPU work is already ordered
``torch.cuda.current_stream()``,                the one do-nothing stream; ``torch.cuda.stream(s)``
``torch.cuda.default_stream()``,                is a null context
``torch.cuda.stream``
``torch.cuda.synchronize()``                    no-op
megatron's CUDA RNG tracker                     :class:`CPURNGStatesTracker`, the same named-state
(``get_cuda_rng_tracker()``)                    API over the CPU generator
the all-to-all dispatcher's                     also turns *CPU* split-size tensors into numpy
``maybe_move_tensor_to_cpu``                    arrays when asked (``as_numpy=True``); megatron
                                                does that only for CUDA tensors, and
                                                ``all_to_all_single`` needs int sequences
==============================================  ==================================================

One more patch is not about CPU: megatron-core 0.16.1's ``moe_utils`` references
``te_general_gemm`` in the router's gating GEMM but defines it only when TransformerEngine is
installed, so without TE every ``TopKRouter`` forward raises ``NameError``. ``install()`` defines it
as ``None`` (megatron's own "no TE" branch, a plain ``torch.mm``) whenever it is missing, on CPU and
GPU alike; :func:`patch_missing_te` does only that.

Nothing else changes: collectives, autograd functions and the math are megatron's own. The shim
is process-wide (megatron looks these names up at call time) and ``uninstall()`` restores the
originals. ``lsp.parallel.topology.init_topology`` installs it for CPU runs (no CUDA, or a gloo
default process group).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["install", "uninstall", "is_installed", "patch_missing_te", "CPURNGStatesTracker"]

_SAVED: dict[str, Any] = {}
_INSTALLED = False


class _CPUEvent:
    """Stands in for ``torch.cuda.Event`` on CPU: every event is already complete."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _CPUStream:
    """Stands in for ``torch.cuda.Stream``: CPU work runs in program order, so it orders nothing."""

    device = torch.device("cpu")

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CPUEvent()

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, _CPUStream)

    def __hash__(self) -> int:
        return 0


_STREAM = _CPUStream()


class CPURNGStatesTracker:
    """megatron's ``CudaRNGStatesTracker`` API over the CPU generator.

    ``add(name, seed)`` records a named generator state; ``fork(name)`` swaps it into the CPU
    default generator for the duration of the block and stores the advanced state on exit, so
    dropout inside ``fork()`` draws from a stream that is reproducible per name, as on GPU.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _patch(obj, name: str, value) -> None:
    key = f"{obj.__name__}.{name}"
    if key not in _SAVED:
        _SAVED[key] = (obj, name, getattr(obj, name, None))
    setattr(obj, name, value)


def is_installed() -> bool:
    return _INSTALLED


def patch_missing_te() -> None:
    """Define ``moe_utils.te_general_gemm = None`` when megatron left it undefined (no TE)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def install(force: bool = False) -> bool:
    """Install the shim for a CPU run; return whether it is active. Idempotent.

    A CPU run is one without CUDA, or one that ``force``s it (``init_topology`` does for a gloo
    process group, whose tensors live on the CPU even on a GPU machine). Without it this is a
    no-op. The TE fix-up (:func:`patch_missing_te`) is applied in every case.
    """
    global _INSTALLED
    patch_missing_te()
    if torch.cuda.is_available() and not force:
        return False
    if _INSTALLED:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    _patch(torch.cuda, "current_device", lambda: torch.device("cpu"))
    _patch(torch.cuda, "Stream", _CPUStream)
    _patch(torch.cuda, "Event", _CPUEvent)
    _patch(torch.cuda, "current_stream", lambda device=None: _STREAM)
    _patch(torch.cuda, "default_stream", lambda device=None: _STREAM)
    _patch(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())
    _patch(torch.cuda, "synchronize", lambda device=None: None)
    from megatron.core.transformer.moe import token_dispatcher

    original_move = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.clone().numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    _patch(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    tracker = CPURNGStatesTracker()
    _patch(mrandom, "_CUDA_RNG_STATE_TRACKER", tracker)
    _patch(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    _INSTALLED = True
    return True


def uninstall() -> None:
    """Restore every patched name."""
    global _INSTALLED
    for obj, name, value in _SAVED.values():
        setattr(obj, name, value)
    _SAVED.clear()
    _INSTALLED = False
