"""Packed-document offsets read once per tensor, not once per layer.

Every layer of a step gets the same ``cu_seqlens`` tensor, and each op call needs its values on
the host (checks, the chunk table's size). Reading a CUDA tensor on the host waits for the GPU,
so :func:`host_offsets` keeps the values beside the tensor object: the first call of a step
reads them, the layers after it do not. :func:`cached_on` keeps other values derived from the
tensor (the kernels' chunk tables) the same way. An entry holds only a weak reference, so it
goes with its tensor, and it is refreshed when the tensor changes in place (its version
counter); tensors without one (inference mode) are read every time.

It lives in ``lsp.kernels`` (pure torch) because the kernels import nothing of the project, while
``lsp.ops`` and ``lsp.parallel`` may import the kernels' package.
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
