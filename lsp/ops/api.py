"""The two public ops (docs/design.md, The op contract) and their backend choice.

Each op is ``bind`` (parse and check the arguments once, giving a validated
:class:`lsp.parallel.contract.OpCall`) followed by ``run`` (dispatch to the backend without
checking again). Both are exported as ``op.spec`` for ``lsp.parallel.sequence_parallel``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsp.ops.common.chunk import DEFAULT_CHUNK_SIZE, chunk_recurrence
from lsp.ops.common.validate import check_inputs
from lsp.kernels.offsets import host_offsets, on_device
from lsp.ops.common.varlen import check_cu_seqlens, run_documents
from lsp.ops.delta_net.chunk import chunk_delta_rule
from lsp.ops.linear_attn.chunk import chunk_linear_attention
from lsp.parallel.contract import Family, OpCall, OpSpec


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


def _bind_packed(op: str, q, v, cu_seqlens, initial_state, backend) -> None:
    """The packed-document checks (``cu_seqlens``): offsets, per-document states, and that the
    backend can run (both take offsets; an explicit ``"triton"`` on CPU tensors raises here,
    before a sequence-parallel caller's first collective)."""
    check_cu_seqlens(op, q, v, cu_seqlens, initial_state)
    resolve_backend(op, backend, q)


def _fla_forms(op: str, q, k, v, backend):
    """What fla accepts around the plain form: grouped value heads and a half-precision ``v``.

    - ``v`` with ``HV = m * H`` heads (Qwen3-Next's Gated DeltaNet): every query/key head serves
      ``m`` consecutive value heads, so ``q`` and ``k`` repeat along the head axis (autograd sums
      their gradients back); ``beta``, ``g`` and the states are then per value head.
    - a float16 / bfloat16 ``v`` beside float32 ``q``, ``k``: computed in float32, output in
      ``v``'s dtype (the torch path).

    Returns ``(q, k, v_for_checks)``; ``v_for_checks`` has ``q``'s dtype (no copy) so that the
    usual checks see one dtype.
    """
    if not all(isinstance(x, Tensor) and x.dim() == 4 for x in (q, k, v)):
        return q, k, v
    H, HV = q.shape[2], v.shape[2]
    if HV != H and HV % H == 0 and k.shape == q.shape and v.shape[:2] == q.shape[:2]:
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    if (q.dtype == k.dtype == torch.float32 and v.dtype in (torch.float16, torch.bfloat16)):
        if backend == "triton" or (backend == "auto" and
                                   resolve_backend(op, backend, q) == "triton"):
            raise ValueError(f"{op}: a {v.dtype} v beside float32 q, k needs backend='torch' "
                             "until the kernels take it; or cast v to float32")
        return q, k, torch.empty((), dtype=q.dtype, device=v.device).expand(v.shape)
    return q, k, v


def _bind(family: Family, q, k, v, beta, g, scale, initial_state, output_final_state, backend,
          cu_seqlens) -> OpCall:
    """The checks both ops make, and their validated call."""
    name, packed = family.value, cu_seqlens is not None
    q, k, v_checked = _fla_forms(name, q, k, v, backend)
    scale = check_inputs(name, q, k, v_checked, beta, g, scale,
                         None if packed else initial_state, output_final_state, backend,
                         needs_beta=family == Family.DELTA_RULE)
    if packed:
        _bind_packed(name, q, v, cu_seqlens, initial_state, backend)
    return OpCall(family, q, k, v, beta, g, scale, initial_state, output_final_state, backend,
                  cu_seqlens)


def _bind_linear_attention(q, k, v, g=None, *, scale=None, initial_state=None,
                          output_final_state=False, backend="auto", cu_seqlens=None) -> OpCall:
    return _bind(Family.LINEAR_ATTENTION, q, k, v, None, g, scale, initial_state,
                 output_final_state, backend, cu_seqlens)


def _bind_delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None,
                     output_final_state=False, backend="auto", cu_seqlens=None) -> OpCall:
    return _bind(Family.DELTA_RULE, q, k, v, beta, g, scale, initial_state, output_final_state,
                 backend, cu_seqlens)


def _run(c: OpCall) -> tuple[Tensor, Tensor | None]:
    """Run a validated call on its backend (no checks: ``bind`` made them)."""
    name = c.family.value
    if resolve_backend(name, c.backend, c.q) == "triton":  # pragma: no cover
        from lsp import kernels

        kernel = getattr(kernels, name)
        extra = () if c.family == Family.LINEAR_ATTENTION else (c.beta,)
        # the kernels read the offsets on the inputs' device (the torch path takes either)
        cu = None if c.cu_seqlens is None else on_device(c.cu_seqlens, c.q.device)
        return kernel(c.q, c.k, c.v, *extra, c.g, scale=c.scale, initial_state=c.initial_state,
                      output_final_state=c.output_final_state, cu_seqlens=cu)
    if c.cu_seqlens is not None:
        offsets = list(host_offsets(c.cu_seqlens))
        return run_documents(chunk_recurrence, c.q, c.k, c.v, c.g, c.beta, c.scale,
                             c.initial_state, c.output_final_state, offsets, DEFAULT_CHUNK_SIZE)
    if c.family == Family.LINEAR_ATTENTION:
        return chunk_linear_attention(c.q, c.k, c.v, c.g, c.scale, c.initial_state,
                                      c.output_final_state)
    return chunk_delta_rule(c.q, c.k, c.v, c.beta, c.g, c.scale, c.initial_state,
                            c.output_final_state)


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
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Additive linear attention with optional decay.

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`` and ``o_t = scale * S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (one floating dtype; K may differ from V).
            As in fla, ``v`` may have ``HV = m * H`` heads (grouped value heads: each query/key
            head serves ``m`` value heads; ``g``, states per value head) and may be float16 /
            bfloat16 beside float32 ``q``, ``k`` (torch path; output in ``v``'s dtype).
        g: log-space decay: ``None`` (plain linear attention), ``[B, T, H]`` (one decay per head:
            Lightning / RetNet / Mamba-2 style) or ``[B, T, H, K]`` (per key channel: GLA).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token, or ``None`` (zeros).
        output_final_state: also return the state after the last token.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        cu_seqlens: packed documents (fla-compatible): int32 / int64 ``[N+1]`` offsets
            ``0 < ... < T`` with ``B = 1``; each document starts from its own state
            (``initial_state`` ``[N, H, K, V]``) and the final state is ``[N, H, K, V]``. No
            state crosses a boundary. Both backends (the Triton kernels with chunks that
            never straddle a document, as in fla).

    Returns:
        ``(o, S)``: ``o`` ``[B, T, H, V]`` in ``v.dtype``; ``S`` ``[B, H, K, V]`` in float32
        (float64 for float64 inputs), or ``None`` unless ``output_final_state``.
    """
    return _run(_bind_linear_attention(q, k, v, g, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state, backend=backend,
                                 cu_seqlens=cu_seqlens))


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
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The delta rule, with optional decay applied before the delta step.

    ``S_t = (I - b_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``. Keys are used as given; the usual models
            L2-normalise them (and take ``beta`` in (0, 1)) so that the recurrence is stable.
        beta: ``[B, T, H]`` write strength.
        g: ``None`` (DeltaNet), ``[B, T, H]`` (Gated DeltaNet) or ``[B, T, H, K]``
            (vector-gated, KDA-like), in log space.
        scale, initial_state, output_final_state, backend, cu_seqlens: as for
            ``linear_attention``.

    Returns:
        ``(o, S)`` as for ``linear_attention``.
    """
    return _run(_bind_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, backend=backend,
                                 cu_seqlens=cu_seqlens))


linear_attention.spec = OpSpec(Family.LINEAR_ATTENTION, _bind_linear_attention, _run)
delta_rule.spec = OpSpec(Family.DELTA_RULE, _bind_delta_rule, _run)
