"""Short causal depthwise convolution over the sequence, with a halo from the previous CP rank."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lsp.layers.context import ParallelContext, head_parameter

__all__ = ["CONV_BACKENDS", "ShortConvolution"]

CONV_BACKENDS = ("torch", "triton")


class ShortConvolution(nn.Module):
    """``y_t = act(sum_{i<w} W[:, i] * x_{t-w+1+i})`` per channel (fla's ``ShortConvolution``).

    Channels are head-major (``(h d)``), so they split over TP with their heads. Under CP the
    first ``w - 1`` outputs of a shard read the previous rank's last ``w - 1`` inputs through
    :func:`lsp.parallel.halo.halo_exchange` (zeros before the sequence start, as at CP 1).

    Args:
        channels: total channels over all TP ranks; kernel_size: ``w``;
        activation: ``"silu"`` or ``None``.

    ``recompute`` (default off): keep only the input for backward and recompute the
    convolution there (a nested activation checkpoint around everything after the halo
    exchange); the plain form keeps the padded input copy and the pre-activation output, two
    activations per convolution (3 GB per Gated DeltaNet layer at 512K tokens).

    ``backend`` (default ``"torch"``): ``"triton"`` runs ``lsp.kernels.conv.short_conv``
    on the ``[B, T, C]`` layout in place (no transposed copies; the activation fused; only the
    padded input saved, so ``recompute`` has nothing left to save and is not applied). It needs
    CUDA tensors (or Triton's interpreter, ``TRITON_INTERPRET=1``, in tests).
    """

    def __init__(self, channels: int, kernel_size: int, ctx: ParallelContext | None = None,
                 activation: str | None = "silu", *, backend: str = "torch",
                 recompute: bool = False):
        super().__init__()
        if backend not in CONV_BACKENDS:
            raise ValueError(f"ShortConvolution backend={backend!r}: use one of {CONV_BACKENDS}")
        self.backend, self.recompute = backend, recompute
        if kernel_size < 1:
            raise ValueError(f"conv kernel_size={kernel_size}: use a width >= 1")
        if activation not in ("silu", None):
            raise ValueError(f"activation={activation!r}: use 'silu' or None")
        self.ctx = ctx or ParallelContext()
        self.kernel_size, self.activation = kernel_size, activation
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise kernel
        self.weight = head_parameter(
            (channels, 1, kernel_size), self.ctx,
            lambda shape, gen: (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound,
        )

    def forward(self, x: Tensor, copies: int = 1, cu_seqlens: Tensor | None = None) -> Tensor:
        """``x``: ``[B, T, copies * C]`` (this rank's channels, ``copies`` stacked sets sharing the
        kernel); returns the same shape. ``cu_seqlens``: the GLOBAL document offsets of a
        packed sequence (one 1-D tensor for ``B = 1`` or one per row): no tap reads a token of
        an earlier document, inside the shard or through the halo (:meth:`_conv_packed`)."""
        from lsp.parallel.halo import halo_exchange

        w = self.kernel_size - 1
        halo = halo_exchange(x, w, self.ctx.cp_group, dim=1)
        if self.backend == "triton":
            pos = None if cu_seqlens is None else self._doc_positions(x, cu_seqlens)
            return self._conv_triton(x, halo, copies, pos)
        if cu_seqlens is not None:
            if self.recompute and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                return checkpoint(self._conv_packed, x, halo, copies, cu_seqlens,
                                  use_reentrant=False)
            return self._conv_packed(x, halo, copies, cu_seqlens)
        if self.recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._conv, x, halo, copies, use_reentrant=False)
        return self._conv(x, halo, copies)

    def _weight(self, copies: int) -> Tensor:
        """``[copies * C, 1, w]``: the kernel repeated for ``copies`` stacked channel sets."""
        return self.weight.repeat(copies, 1, 1) if copies > 1 else self.weight

    def _conv(self, x: Tensor, halo: Tensor, copies: int) -> Tensor:
        xp = torch.cat([halo, x], dim=1).transpose(1, 2)  # [B, C, T + w - 1]
        weight = self._weight(copies)
        y = F.conv1d(xp, weight.to(x.dtype), groups=weight.shape[0]).transpose(1, 2)
        return F.silu(y) if self.activation == "silu" else y

    def _conv_packed(self, x: Tensor, halo: Tensor, copies: int, cu_seqlens: Tensor) -> Tensor:
        """The convolution with the taps that reach into an earlier document masked to zero.

        ``y_t = sum_j W[w - j] x_{t-j} [j <= position of t in its document]``: one masked
        multiply-add per tap (the kernels are short).
        """
        w, T = self.kernel_size - 1, x.shape[1]
        pos = self._doc_positions(x, cu_seqlens)
        xp = torch.cat([halo, x], dim=1)  # [B, T + w, C]
        weight = self._weight(copies)[:, 0].to(x.dtype)  # [C, w + 1]
        y = xp[:, w:] * weight[:, w]
        for j in range(1, w + 1):
            keep = (pos >= j).to(x.dtype)[..., None]
            y = y + xp[:, w - j:w - j + T] * weight[:, w - j] * keep
        return F.silu(y) if self.activation == "silu" else y

    def _doc_positions(self, x: Tensor, cu_seqlens: Tensor) -> Tensor:
        """``[B, T]``: each of this shard's tokens' position in its document (global offsets,
        this CP rank's slice)."""
        from lsp.parallel.packed import document_positions

        from lsp.layers.context import document_rows

        T = x.shape[1]
        return torch.stack([document_positions(r, self.ctx.cp_rank * T, T)
                            for r in document_rows(cu_seqlens, x.shape[0])]).to(x.device)

    def _conv_triton(self, x: Tensor, halo: Tensor, copies: int,
                     pos: Tensor | None = None) -> Tensor:
        import os

        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("conv_backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for "
                             "Triton's CPU interpreter); use conv_backend='torch' on CPU")
        from lsp.kernels.conv import short_conv

        weight = self._weight(copies)
        xp = torch.cat([halo, x], dim=1)
        return short_conv(xp, weight.view(weight.shape[0], -1), self.activation == "silu",
                          doc_pos=pos)
