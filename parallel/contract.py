"""What ``sequence_parallel`` needs from an op, stated once (docs/design.md, The op contract).

``lsp.parallel`` does not import ``lsp.ops`` (dependencies point launch -> lsp -> parallel ->
kernels), so the ops describe themselves with an :class:`OpSpec` attached as ``op.spec``:

- ``spec.bind(*args, **kwargs)`` takes exactly the op's own arguments, checks them (the op's
  named ``ValueError``s) and returns an :class:`OpCall`, the validated call;
- ``spec.run(call)`` runs the op on an already validated call without checking again; the
  sequence-parallel pass uses it to run the local shard with its own initial state and outputs.

The vocabulary: :class:`Family` (which op), :class:`lsp.kernels.kinds.Gate` (the shape of ``g``)
and :class:`Transition` (what the affine transition ``A`` of a stretch of tokens is, which decides
what crosses the wire).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
from torch import Tensor

from lsp.kernels.kinds import Gate


class Family(str, Enum):
    """The two op families."""

    LINEAR_ATTENTION = "linear_attention"
    DELTA_RULE = "delta_rule"


class Transition(str, Enum):
    """The transition ``A`` of a stretch of tokens, ``S_end = A S_start + B``.

    ========  ==================  ================================================
    value     ``A`` tensor        op and gate
    ========  ==================  ================================================
    identity  ``None``            linear attention, ``Gate.NONE``
    scalar    ``[B, H]``          linear attention, ``Gate.HEAD``
    diagonal  ``[B, H, K]``       linear attention, ``Gate.KEY``
    full      ``[B, H, K, K]``    the delta rule, every gate
    ========  ==================  ================================================
    """

    IDENTITY = "identity"
    SCALAR = "scalar"
    DIAGONAL = "diagonal"
    FULL = "full"

    @classmethod
    def of(cls, family: Family, gate: Gate) -> "Transition":
        if family == Family.DELTA_RULE:
            return cls.FULL
        return {Gate.NONE: cls.IDENTITY, Gate.HEAD: cls.SCALAR, Gate.KEY: cls.DIAGONAL}[gate]


@dataclass(frozen=True)
class OpCall:
    """A validated call of an lsp op: its tensors and resolved keywords.

    Tensors are ``[B, T, H, D]``; ``beta`` is ``None`` for linear attention; ``scale`` is
    resolved (``K ** -0.5`` when the caller passed ``None``). ``cu_seqlens`` (packed documents,
    ``B = 1``) holds the document offsets; ``initial_state`` is then ``[N, H, K, V]``.
    """

    family: Family
    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor | None
    g: Tensor | None
    scale: float
    initial_state: Tensor | None
    output_final_state: bool
    backend: str
    cu_seqlens: Tensor | None = None

    @property
    def gate(self) -> Gate:
        return Gate.of(self.g)

    @property
    def transition(self) -> Transition:
        return Transition.of(self.family, self.gate)

    @property
    def state_dtype(self) -> torch.dtype:
        """float64 for float64 inputs, float32 otherwise (states and pairs)."""
        return torch.float64 if self.q.dtype == torch.float64 else torch.float32

    def replace(self, **changes) -> "OpCall":
        """The same call with some fields changed (e.g. another initial state)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class OpSpec:
    """How ``sequence_parallel`` calls an op (see the module docstring)."""

    family: Family
    bind: Callable[..., OpCall]
    run: Callable[[OpCall], tuple[Tensor, Tensor | None]]


def spec_of(op: Callable) -> OpSpec:
    """The op's :class:`OpSpec`; raises ``ValueError`` for anything but an lsp op."""
    spec = getattr(op, "spec", None)
    if not isinstance(spec, OpSpec):
        raise ValueError(
            f"sequence_parallel: op={getattr(op, '__name__', op)!r} is not an lsp op; pass "
            "lsp.ops.linear_attention or lsp.ops.delta_rule"
        )
    return spec


__all__ = ["Family", "Gate", "Transition", "OpCall", "OpSpec", "spec_of"]
