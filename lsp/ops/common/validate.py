"""Input checks for the public ops: every error names the offending value and the fix."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "triton")


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _check_tensor(op: str, name: str, x: object, layout: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(
            f"{op}: {name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: {name} has dtype {x.dtype}; use one of float16, bfloat16, float32, float64 "
            f"(for example {name}.float())"
        )
    return x


def check_log_gate(op: str, g: Tensor) -> None:
    """Log-gates must be ``<= 0``; ``-inf`` (a full forget, a hard reset) is allowed.

    ``exp(g)`` is the decay of the state per token: in ``(0, 1]`` for ``g <= 0`` and 0 for
    ``-inf``. A positive ``g`` grows the state and overflows the chunkwise forms, which divide
    cumulative decays. CPU tensors are checked here (no device to wait for). CUDA tensors get
    ``torch._assert_async``: a device-side check queued on the stream, so the training step gets
    no host sync; a violation fails the next synchronising call (the loop's loss read) with a
    device-side assert, after which the CUDA context is unusable and the rank exits. NaN is not
    rejected: like torch, NaN propagates (the training loop stops on a non-finite loss).
    """
    if g.is_cuda:
        torch._assert_async(~(g > 0).any(),
                            f"{op}: g has a positive entry; log-gates must be <= 0 (-inf allowed)")
        return
    positive = g > 0
    if positive.any():
        raise ValueError(
            f"{op}: g has {int(positive.sum())} positive entries (max {g.max().item():g}); "
            "log-gates must be <= 0 (a decay exp(g) in (0, 1]; -inf is a full forget): use "
            "e.g. F.logsigmoid(x) or -F.softplus(x)"
        )


def check_inputs(
    op: str,
    q: object,
    k: object,
    v: object,
    beta: object,
    g: object,
    scale: object,
    initial_state: object,
    output_final_state: object,
    backend: object,
    *,
    needs_beta: bool,
) -> float:
    """Validate the arguments of ``linear_attention`` / ``delta_rule``; return the resolved scale.

    Raises ``ValueError`` with a message that names the offending value and says what to change.
    """
    q = _check_tensor(op, "q", q, "[B, T, H, K]")
    k = _check_tensor(op, "k", k, "[B, T, H, K]")
    v = _check_tensor(op, "v", v, "[B, T, H, V]")
    if q.dim() != 4:
        raise ValueError(
            f"{op}: q has shape {_shape(q)} ({q.dim()} dims); lsp expects [B, T, H, K] "
            "(batch, time, heads, head dim). Add the missing batch or head dim with unsqueeze, "
            "and transpose(1, 2) a [B, H, T, K] tensor."
        )
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(
            f"{op}: k has shape {_shape(k)} but q has {_shape(q)}; q and k must both be [B, T, H, K]"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{op}: v has shape {_shape(v)} but q has {_shape(q)}; v must be "
            f"[B, T, H, V] = [{B}, {T}, {H}, V] (only the last dim may differ from q)"
        )
    if min(B, T, H, K, v.shape[-1]) < 1:
        raise ValueError(
            f"{op}: q has shape {_shape(q)} and v {_shape(v)}; every dim must be >= 1 "
            "(an empty sequence has no output: skip the call)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{op}: q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; they must match "
            f"(cast them, e.g. k.to(q.dtype))"
        )
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(
                f"{op}: {name} is on {x.device} but q is on {q.device}; move all inputs to one device"
            )

    if g is not None:
        g = _check_tensor(op, "g", g, "[B, T, H] or [B, T, H, K]")
        if g.shape not in (torch.Size((B, T, H)), torch.Size((B, T, H, K))):
            raise ValueError(
                f"{op}: g has shape {_shape(g)}; the log-space decay must be [B, T, H] = "
                f"[{B}, {T}, {H}] (one per head) or [B, T, H, K] = [{B}, {T}, {H}, {K}] "
                "(one per key channel), or None for no decay"
            )
        if g.device != q.device:
            raise ValueError(f"{op}: g is on {g.device} but q is on {q.device}; move it to {q.device}")
        check_log_gate(op, g)

    if needs_beta:
        if beta is None:
            raise ValueError(
                f"{op}: beta is None; the delta rule needs beta [B, T, H] = [{B}, {T}, {H}], "
                "the per-token write strength (usually sigmoid of a projection, in (0, 1))"
            )
        beta = _check_tensor(op, "beta", beta, "[B, T, H]")
        if beta.shape != torch.Size((B, T, H)):
            raise ValueError(
                f"{op}: beta has shape {_shape(beta)}; it must be [B, T, H] = [{B}, {T}, {H}]"
            )
        if beta.device != q.device:
            raise ValueError(
                f"{op}: beta is on {beta.device} but q is on {q.device}; move it to {q.device}"
            )

    if scale is None:
        scale = K**-0.5
    else:
        if isinstance(scale, Tensor) and scale.numel() == 1:
            scale = scale.item()
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise ValueError(
                f"{op}: scale={scale!r} is not a real number; pass a float such as "
                f"{K**-0.5:.6g} (K ** -0.5, the default when scale is None)"
            )
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(
                f"{op}: scale={scale} is not finite; pass a finite float such as "
                f"{K**-0.5:.6g} (K ** -0.5, the default when scale is None)"
            )

    if initial_state is not None:
        V = v.shape[-1]
        s = _check_tensor(op, "initial_state", initial_state, "[B, H, K, V]")
        if s.shape != torch.Size((B, H, K, V)):
            raise ValueError(
                f"{op}: initial_state has shape {_shape(s)}; the state must be [B, H, K, V] = "
                f"[{B}, {H}, {K}, {V}] (k-major: key dim before value dim)"
            )
        if s.device != q.device:
            raise ValueError(
                f"{op}: initial_state is on {s.device} but q is on {q.device}; move it to {q.device}"
            )

    if not isinstance(output_final_state, bool):
        raise ValueError(
            f"{op}: output_final_state={output_final_state!r}; pass True or False"
        )
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is unknown; choose one of {BACKENDS}")
    return scale
