"""Compile the WY intra-chunk kernel for Hopper (sm_90) on this CPU machine.

The Triton interpreter does not type-check; the real compiler does, and on the H100 it rejected
``intra_fwd_kernel`` when the key and value block widths differ (K=32 with the sequence-parallel
augmented V=64: one name bound to blocks of two widths in the two branches of a runtime ``if``).
Triton's wheel carries ``ptxas``, so the front end and PTX/cubin generation run without a GPU.
"""

from __future__ import annotations

import pytest
import triton  # a dependency of the project on Linux
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lsp.kernels.delta_net.intra import intra_fwd_kernel

SIGNATURE = {"k": "*bf16", "v": "*bf16", "beta": "*fp32", "G": "*fp32", "Pm": "*fp32",
             "w": "*bf16", "u": "*bf16", "TA": "*fp32", "T": "i32", "H": "constexpr",
             "K": "constexpr", "V": "constexpr", "BT": "constexpr", "BC": "constexpr",
             "NC": "constexpr", "BKI": "constexpr", "BVI": "constexpr", "GATE": "constexpr",
             "STORE_TA": "constexpr", "IP": "constexpr"}


@pytest.mark.parametrize("K,V", [(32, 64), (64, 32), (128, 256)])
@pytest.mark.parametrize("gate", [0, 1, 2])
def test_intra_fwd_kernel_compiles_for_sm90(K, V, gate):
    consts = {"H": 4, "K": K, "V": V, "BT": 64, "BC": 16, "NC": 4, "BKI": min(K, 64),
              "BVI": min(V, 64), "GATE": gate, "STORE_TA": False, "IP": "tf32"}
    src = ASTSource(fn=intra_fwd_kernel, signature=SIGNATURE, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert "intra_fwd_kernel" in compiled.asm["ptx"]
