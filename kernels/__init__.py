"""lsp.kernels: Triton kernels for the two op families (chunkwise forward and backward).

Kernels import nothing of the rest of the project (DESIGN.md §2). Until the kernels land,
``available()`` reports why they cannot be used, and ``backend="triton"`` raises that reason.
"""

from __future__ import annotations


def unavailable_reason() -> str | None:
    """Why ``backend="triton"`` cannot run here, or None when it can."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"Triton is not importable ({exc!r}); install triton or use backend='torch'"
    return (
        "the Triton kernels are not part of this lsp version yet; use backend='torch' "
        "(or backend='auto', which picks the torch path until the kernels land)"
    )


def available() -> bool:
    """True when ``backend="triton"`` can run on this machine."""
    return unavailable_reason() is None
