"""lsp.kernels: Triton kernels for the two op families (chunkwise forward and backward).

Kernels import nothing of the rest of the project (docs/design.md, Layout). ``lsp.ops`` calls
:func:`linear_attention` and :func:`delta_rule` for ``backend="triton"`` (and for ``"auto"`` on
CUDA tensors); :func:`unavailable_reason` says why they cannot run, or None when they can.

Layout, one folder per family as in flash-linear-attention:

- ``common/``: the parts both families share: chunk-local gate sums (``gate.py``), overflow-safe
  pairwise products for per-channel gates (``pairwise.py``), the chunk-state passes and the
  segment scan (``state.py``), per-chunk gradients (``grad.py``) and the autograd function that
  strings them together (``chunk.py``); block sizes and segment counts by rule (``utils.py``).
- ``linear_attn/``: additive linear attention (``R = V``).
- ``delta_net/``: the delta rule's WY form and its backward: ``wy.py`` (no gate or one per
  head: fused ``k k^T`` + triangular solve, ``W``/``U``, backward), ``intra.py`` (per-channel gate),
  ``stages.py`` (their launches, which ``chunk.py`` hands to ``common/``; ``common/`` imports
  no family).
- ``conv/``: the layers' short causal depthwise convolution on the ``[B, T, C]`` layout
  (``short_conv``; ``model.conv_backend=triton``).

Packed documents (``cu_seqlens``) follow fla's convention: a chunk never straddles a document,
the per-chunk kernels read (document, chunk) from ``chunk_indices`` (``common/utils.py``) under a
constexpr ``IS_VARLEN``, and the state passes run one program per document, head and value block.

The per-token float64 oracles live beside the torch path in ``lsp/ops/*/naive.py``.
"""

from __future__ import annotations

from typing import Optional

DEFAULT_CHUNK_SIZE = 64
CHUNK_SIZES = (16, 32, 64)

def _clamp_full_forget(g):
    from .kinds import FULL_FORGET_FLOOR_F32, clamp_full_forget

    return clamp_full_forget(g, FULL_FORGET_FLOOR_F32)


def unavailable_reason() -> Optional[str]:
    """Why ``backend="triton"`` cannot run here, or None when it can."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"Triton is not importable ({exc!r}); install triton or use backend='torch'"
    return None


def available() -> bool:
    """True when ``backend="triton"`` can run on this machine."""
    return unavailable_reason() is None


def _check(op, q, v, chunk_size):
    import torch

    from .common import chunk  # noqa: F401  (imports the kernels: fixes interpreted())
    from .common.utils import MAX_K, interpreted

    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"{op}: the Triton kernels take float16, bfloat16 or float32 inputs, got {q.dtype}; "
            "cast the inputs (e.g. q.float()) or use backend='torch' (which runs float64)"
        )
    K = q.shape[-1]
    if K > MAX_K:
        raise ValueError(
            f"{op}: key head dim K={K} is above the kernels' limit of {MAX_K}; use more heads "
            "with smaller K, or backend='torch'"
        )
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"{op}: chunk_size={chunk_size}; the kernels support {CHUNK_SIZES}")
    if interpreted() and q.dtype == torch.bfloat16:
        raise ValueError(
            f"{op}: Triton's CPU interpreter computes bfloat16 dot products wrongly (seen with "
            "triton 3.9); under TRITON_INTERPRET=1 use float16 or float32 inputs"
        )
    if not q.is_cuda and not interpreted():
        raise ValueError(
            f"{op}: the Triton kernels need CUDA tensors (got {q.device}); move the inputs to a "
            "GPU, set TRITON_INTERPRET=1 to run Triton's CPU interpreter, or use backend='torch'"
        )


def _check_packed(op, q, v, cu_seqlens, initial_state):
    """A packed call's offsets (``B = 1``, int32 / int64 ``[N+1]`` on ``q``'s device, strictly
    increasing from 0 to T) and per-document initial states ``[N, H, K, V]``.

    Reads the offsets on the host once per tensor (``offsets.host_offsets``: the layers of a
    step share one ``cu_seqlens``, so only the first call waits for the GPU).
    Returns the offsets, or None when there is a single document: that call is exactly the
    dense call of ``B = 1`` (same chunks, states ``[1, H, K, V]``), which keeps the in-GPU
    segment split.
    """
    from .offsets import check_document_states, check_offsets

    if cu_seqlens is None:
        return None
    B, T, H, K = q.shape
    cu = check_offsets(op, cu_seqlens, T)
    if cu_seqlens.device != q.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; "
                         f"move it to {q.device}")
    if B != 1:
        raise ValueError(f"{op}: cu_seqlens needs a batch of 1 (documents packed along T), got "
                         f"B={B}; reshape to [1, B*T, H, D] with offsets for every document")
    N = len(cu) - 1
    check_document_states(op, initial_state, N, H, K, v.shape[-1], q.device)
    return None if N == 1 else cu_seqlens


def linear_attention(q, k, v, g=None, *, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=DEFAULT_CHUNK_SIZE, num_segments=None,
                     cu_seqlens=None, boundary=None):
    """Chunkwise linear attention on the Triton kernels (contract of ``lsp.ops.linear_attention``).

    ``chunk_size`` (16, 32 or 64) and ``num_segments`` (in-GPU sequence segments; None: by rule,
    see ``common/utils.choose_segments``) are tuning knobs with no effect on the result beyond
    rounding. ``cu_seqlens``: packed documents (fla's form: ``B = 1``, int32 / int64 ``[N+1]``
    offsets on the inputs' device; per-document ``initial_state`` and final state
    ``[N, H, K, V]``), exact with no padding of documents to the chunk size; there
    ``num_segments`` is the number of segments the longest document is cut into (None: by rule,
    ``common/utils.choose_doc_segments``). Returns ``(o, S)``: ``o`` in ``v.dtype``,
    ``S`` ``[B,H,K,V]`` (``[N,H,K,V]``) float32 or None. ``boundary``: as for
    :func:`delta_rule`.
    """
    _check("linear_attention", q, v, chunk_size)
    cu_seqlens = _check_packed("linear_attention", q, v, cu_seqlens, initial_state)
    from .linear_attn import chunk_linear_attention

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return chunk_linear_attention(q, k, v, _clamp_full_forget(g), scale, initial_state,
                                  output_final_state, chunk_size, num_segments, cu_seqlens,
                                  boundary)


def delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None,
               output_final_state=False, chunk_size=DEFAULT_CHUNK_SIZE, num_segments=None,
               cu_seqlens=None, boundary=None):
    """Chunkwise (gated) delta rule on the Triton kernels (contract of ``lsp.ops.delta_rule``;
    ``cu_seqlens`` as for :func:`linear_attention`). ``boundary``: this call is one rank's
    slice of a sequence-parallel run (``lsp.parallel.sequence_parallel`` passes it; see
    ``common/chunk.chunk_forward``); ``initial_state`` is then the state before the whole
    sequence and the final state the state after it."""
    _check("delta_rule", q, v, chunk_size)
    cu_seqlens = _check_packed("delta_rule", q, v, cu_seqlens, initial_state)
    from .delta_net import chunk_delta_rule

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return chunk_delta_rule(q, k, v, beta, _clamp_full_forget(g), scale, initial_state,
                            output_final_state, chunk_size, num_segments, cu_seqlens, boundary)


__all__ = ["linear_attention", "delta_rule", "unavailable_reason", "available"]
