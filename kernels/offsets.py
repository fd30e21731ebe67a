"""Packed-document offsets read once per tensor, not once per layer.

Every layer of a step gets the same ``cu_seqlens`` tensor, and each op call needs its values on
the host (checks, the chunk table's size). Reading a CUDA tensor on the host waits for the GPU,
so :func:`host_offsets` keeps the values beside the tensor object: the first call of a step
reads them, the layers after it do not. :func:`cached_on` keeps other values derived from the
tensor (the kernels' chunk tables) the same way. An entry holds only a weak reference, so it
goes with its tensor, and it is refreshed when the tensor changes in place (its version
counter); tensors without one (inference mode) are read every time.

The checks of a packed call's offsets and per-document states (:func:`check_offsets`,
:func:`check_document_states`) live here too, shared by the ops, sequence parallelism and the
kernels. It lives in ``lsp.kernels`` (pure torch) because the kernels import nothing of the
project, while ``lsp.ops`` and ``lsp.parallel`` may import the kernels' package.
"""

from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

# id(tensor) -> (weak reference, version, {key: value})
_CACHE: dict[int, tuple[weakref.ref, int, dict]] = {}


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def cached_on(t: torch.Tensor, key, build: Callable[[], T]) -> T:
    """``build()`` once per (tensor object, in-place version, ``key``)."""
    version = _version(t)
    if version is None:
        return build()
    tid = id(t)
    entry = _CACHE.get(tid)
    if entry is None or entry[0]() is not t or entry[1] != version:
        ref = weakref.ref(t, lambda _r, tid=tid, cache=_CACHE: cache.pop(tid, None))
        entry = (ref, version, {})
        _CACHE[tid] = entry
    values = entry[2]
    if key not in values:
        values[key] = build()
    return values[key]


def host_offsets(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """The offsets as Python ints, read from the device once per tensor (see the module)."""
    return cached_on(cu_seqlens, "host", lambda: tuple(int(x) for x in cu_seqlens.tolist()))


def on_device(cu_seqlens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` on ``device``: one copy per tensor, which knows its host values (read
    from the source, so a CPU ``cu_seqlens`` is never read back from the GPU)."""
    if cu_seqlens.device == device:
        return cu_seqlens

    def copy():
        moved = cu_seqlens.to(device)
        values = host_offsets(cu_seqlens)
        cached_on(moved, "host", lambda: values)
        return moved
    return cached_on(cu_seqlens, ("on", str(device)), copy)


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


# The checks of a packed call, shared by the ops, sequence parallelism and the kernels.


def check_offsets(op: str, cu_seqlens: object, T: int, what: str = "the sequence") -> list[int]:
    """Offsets of a packed call as ints; raises a named ``ValueError`` for bad ones."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(
            f"{op}: cu_seqlens must be an int32 or int64 tensor [N+1] of document offsets, "
            f"got {type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{op}: cu_seqlens has dtype {cu_seqlens.dtype}; document offsets must be int32 or "
            "int64 (for example cu_seqlens.long())"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{op}: cu_seqlens has shape {_shape(cu_seqlens)}; it must be 1-D [N+1] with N >= 1 "
            "documents: [0, end of document 0, ..., T]"
        )
    cu = list(host_offsets(cu_seqlens))
    if cu[0] != 0:
        raise ValueError(f"{op}: cu_seqlens starts at {cu[0]}; the first offset must be 0")
    if cu[-1] != T:
        raise ValueError(
            f"{op}: cu_seqlens ends at {cu[-1]} but {what} has T={T} tokens; the last "
            f"offset must be T={T}"
        )
    for i in range(len(cu) - 1):
        if cu[i + 1] <= cu[i]:
            raise ValueError(
                f"{op}: cu_seqlens is not strictly increasing: cu_seqlens[{i}]={cu[i]} and "
                f"cu_seqlens[{i + 1}]={cu[i + 1]}; every document needs at least one token "
                "(drop empty documents from the offsets)"
            )
    return cu


def check_document_states(op: str, initial_state: object, N: int, H: int, K: int, V: int,
                          device: torch.device) -> None:
    """``initial_state`` of a packed call must be ``[N, H, K, V]`` (one per document)."""
    if initial_state is None:
        return
    if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
        raise ValueError(
            f"{op}: initial_state must be a floating tensor [N, H, K, V] = [{N}, {H}, {K}, {V}], "
            f"got {getattr(initial_state, 'dtype', type(initial_state).__name__)}"
        )
    if initial_state.shape != torch.Size((N, H, K, V)):
        raise ValueError(
            f"{op}: initial_state has shape {_shape(initial_state)}; with cu_seqlens of {N} "
            f"documents the state must be [N, H, K, V] = [{N}, {H}, {K}, {V}] (one per document)"
        )
    if initial_state.device != device:
        raise ValueError(
            f"{op}: initial_state is on {initial_state.device} but q is on {device}; move it "
            f"to {device}"
        )
