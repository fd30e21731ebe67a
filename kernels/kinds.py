"""The one vocabulary for the shape of a decay gate, shared by the ops, the sequence-parallel
pairs and the kernels' Python side (the kernels read the integer as their ``GATE`` constexpr).

============  ==================  ===============================================================
``Gate``      ``g``               models (layer ``decay`` options that give it)
============  ==================  ===============================================================
``NONE``      ``None``            linear attention, DeltaNet
``HEAD``      ``[B, T, H]``       one decay per head: Lightning / RetNet (``fixed``), simple GLA,
                                  Mamba-2 (``head``), Gated DeltaNet
``KEY``       ``[B, T, H, K]``    one decay per key channel: GLA (``key``), KDA-like delta rule
============  ==================  ===============================================================

It lives in ``lsp.kernels`` because the kernels import nothing of the project while the ops and
``lsp.parallel`` may import the kernels' package.
"""

from __future__ import annotations

from enum import IntEnum


class Gate(IntEnum):
    """Shape of the log-space decay ``g`` of an op call (see the module table)."""

    NONE = 0
    HEAD = 1
    KEY = 2

    @classmethod
    def of(cls, g) -> "Gate":
        """The gate kind of ``g`` (``None``, ``[B,T,H]`` or ``[B,T,H,K]``; shapes checked by
        the ops)."""
        if g is None:
            return cls.NONE
        return cls.HEAD if g.dim() == 3 else cls.KEY

    @property
    def label(self) -> str:
        """Lower-case name for messages, benchmark tables and command-line options."""
        return self.name.lower()

    @classmethod
    def parse(cls, label: str) -> "Gate":
        """``"none" | "head" | "key"`` -> ``Gate``; raises ``ValueError`` naming the choices."""
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"gate {label!r} is unknown; choose one of "
                             f"{[g.label for g in cls]}") from None


# A log-gate of -inf is a full forget (a hard reset): exp(-inf) = 0. Chunkwise forms work on
# cumulative gates and their differences, where -inf - -inf is NaN, so every path clamps g from
# below at a floor whose exponential, plus any further decay (g <= 0), underflows to exactly 0 in
# its arithmetic: the same numbers as -inf, without NaN. Autograd's clamp gives g the gradient 0
# there, the oracle's (d/dg exp(g) x = 0 at g = -inf).
FULL_FORGET_FLOOR_F64 = -1024.0
"""Floor for float64 running sums (the torch path, the sequence-parallel pairs): float64
underflows below about -745."""
FULL_FORGET_FLOOR_F32 = -110.0
"""Floor before the float32 kernels: float32 underflows below about -103.3; as high as that
allows, since the cumulative gate after a full forget carries it and float32 keeps differences
of later tokens to about 1e-5 of it."""


def clamp_full_forget(g, floor: float = FULL_FORGET_FLOOR_F64):
    """``g`` (a tensor or None) with ``-inf`` and anything below ``floor`` raised to it."""
    return None if g is None else g.clamp(min=floor)


__all__ = ["Gate", "FULL_FORGET_FLOOR_F64", "FULL_FORGET_FLOOR_F32", "clamp_full_forget"]
