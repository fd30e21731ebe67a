"""The two public ops (DESIGN.md §3) and their backend choice."""

from __future__ import annotations

import torch
from torch import Tensor

from lsp.ops.common.validate import check_inputs
from lsp.ops.delta_net.chunk import chunk_delta_rule
from lsp.ops.delta_net.fixup import delta_rule_transition
from lsp.ops.linear_attn.chunk import chunk_linear_attention


def resolve_backend(op: str, backend: str, q: Tensor) -> str:
    """``"torch"`` or ``"triton"`` for this call; raises when ``"triton"`` cannot run.

    ``"auto"`` picks Triton for CUDA tensors of fp16 / bf16 / fp32 when ``lsp.kernels`` can run
    there, and the torch path otherwise (CPU tensors, float64, or no usable Triton). An explicit ``"triton"`` never
    falls back: it raises with the reason.
    """
    from lsp import kernels

    if backend == "torch":
        return "torch"
    reason = kernels.unavailable_reason()
    if backend == "auto":
        # the kernels take fp16 / bf16 / fp32; float64 (reference runs) stays on the torch path
        usable = q.is_cuda and reason is None and q.dtype != torch.float64
        return "triton" if usable else "torch"
    if reason is not None:
        raise ValueError(f"{op}: backend='triton' cannot run: {reason}")
    if not q.is_cuda:
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors, got tensors on {q.device}; move them to "
            "a GPU or use backend='torch'"
        )
    return "triton"


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Additive linear attention with optional decay.

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`` and ``o_t = scale * S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (one floating dtype; K may differ from V).
        g: log-space decay: ``None`` (plain linear attention), ``[B, T, H]`` (one decay per head:
            Lightning / RetNet / Mamba-2 style) or ``[B, T, H, K]`` (per key channel: GLA).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token, or ``None`` (zeros).
        output_final_state: also return the state after the last token.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(o, S)``: ``o`` ``[B, T, H, V]`` in ``v.dtype``; ``S`` ``[B, H, K, V]`` in float32
        (float64 for float64 inputs), or ``None`` unless ``output_final_state``.
    """
    scale = check_inputs(
        "linear_attention", q, k, v, None, g, scale, initial_state, output_final_state, backend,
        needs_beta=False,
    )
    if resolve_backend("linear_attention", backend, q) == "triton":  # pragma: no cover
        from lsp.kernels import linear_attention as kernel

        return kernel(q, k, v, g, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state)
    return chunk_linear_attention(q, k, v, g, scale, initial_state, output_final_state)


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """The delta rule, with optional decay applied before the delta step.

    ``S_t = (I - b_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``. Keys are used as given; the usual models
            L2-normalise them (and take ``beta`` in (0, 1)) so that the recurrence is stable.
        beta: ``[B, T, H]`` write strength.
        g: ``None`` (DeltaNet), ``[B, T, H]`` (Gated DeltaNet) or ``[B, T, H, K]``
            (vector-gated, KDA-like), in log space.
        scale, initial_state, output_final_state, backend: as for ``linear_attention``.

    Returns:
        ``(o, S)`` as for ``linear_attention``.
    """
    scale = check_inputs(
        "delta_rule", q, k, v, beta, g, scale, initial_state, output_final_state, backend,
        needs_beta=True,
    )
    if resolve_backend("delta_rule", backend, q) == "triton":  # pragma: no cover
        from lsp.kernels import delta_rule as kernel

        return kernel(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state)
    return chunk_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state)


# What lsp.parallel.sequence_parallel reads off an op (parallel/ does not import lsp.ops): the
# family, the op's own argument checks (which return the resolved scale), and for the delta rule
# the transition and effective queries of a shard (the chunk transition algebra, torch ops on any
# device: the shard's op call then runs at value width V on the chosen backend).
linear_attention.sp_family = "linear_attention"
linear_attention.sp_validate = (
    lambda q, k, v, beta, g, scale, initial_state, output_final_state, backend: check_inputs(
        "linear_attention", q, k, v, None, g, scale, initial_state, output_final_state, backend,
        needs_beta=False))
delta_rule.sp_family = "delta_rule"
delta_rule.sp_validate = (
    lambda q, k, v, beta, g, scale, initial_state, output_final_state, backend: check_inputs(
        "delta_rule", q, k, v, beta, g, scale, initial_state, output_final_state, backend,
        needs_beta=True))
delta_rule.sp_transition = delta_rule_transition
