"""``lsp.testing``: what the test suite and the GPU checks in ``lsp.launch`` share.

- ``lsp.testing.ops``: random op inputs (``make_inputs``), an op's positional arguments
  (``op_args``, ``call``), the float64 per-token oracle (``naive_for``, ``upcast``,
  ``outputs_and_grads``), the relative error ``rel_err`` and ``kernels_on_cpu`` (the
  kernels under Triton's interpreter behind ``backend="triton"``);
- ``lsp.testing.distributed``: ``run_ranks``, a function on P gloo ranks (CPU processes), and
  ``run_in_child``, a function in one forked process (for a test that trains in-process);
- ``lsp.testing.equivalence``: the layout-equivalence harness (tiny models of every mixer kind
  under a parallel layout against the one-process run; imports megatron-core, so import it by
  name).
"""

from lsp.testing.distributed import run_in_child, run_ranks
from lsp.testing.ops import (
    FAMILIES,
    GATES,
    call,
    kernels_on_cpu,
    make_inputs,
    naive_for,
    op_args,
    outputs_and_grads,
    rel_err,
    upcast,
)

__all__ = ["FAMILIES", "GATES", "rel_err", "make_inputs", "op_args", "call", "naive_for",
           "upcast", "outputs_and_grads", "kernels_on_cpu", "run_ranks", "run_in_child"]
