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


__all__ = ["Gate"]
