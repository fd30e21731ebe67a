"""Gloo ranks for the layer, model and topology tests (CPU, fp32).

``run_ranks(fn, world_size, *args)`` is ``tests/distributed.py``'s spawner with forked processes
(the parent has already imported torch and megatron, so a rank starts in milliseconds).

Also: the model configs and layouts of the equivalence tests, the one-process reference run and
the per-layout comparison, shared by tests/test_model_layouts.py.
"""

from __future__ import annotations

import torch

# Imported here so that forked ranks inherit them instead of importing megatron each.
import lsp.layers  # noqa: F401
import lsp.model  # noqa: F401
import lsp.parallel.topology  # noqa: F401


def run_ranks(fn, world_size: int, *args, timeout: float = 300):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks
    (``tests/distributed.py``'s spawner with ``start="fork"``)."""
    from distributed import run_ranks as _run

    return _run(fn, world_size, *args, timeout=timeout, start="fork")


# ------------------------------------------------------------------------------------------------
# Layout equivalence (cases and comparison live in lsp.model.equivalence, shared with the GPU check)
# ------------------------------------------------------------------------------------------------

from lsp.model.equivalence import (  # noqa: E402
    BASE,
    CASES,
    LAYOUTS,
    METHODS,
    SEED,
    TOL,
    batch,
    compare,
    rel_err,
    snapshot,
    train_step,
)

__all__ = ["run_ranks", "reference_rank", "layout_rank", "BASE", "CASES", "LAYOUTS",
           "METHODS", "SEED", "TOL", "batch", "rel_err", "train_step"]


def reference_rank(rank, world, path):
    """The one-process run of every case (world size 1), saved for the layout ranks."""
    from lsp.parallel.topology import init_topology

    topo = init_topology()
    torch.save({case: snapshot(*train_step(case, topo)) for case in CASES}, path)
    return sorted(CASES)


def layout_rank(rank, world, tp, cp, ep, path):
    """Every case under this layout (every SP method when CP > 1) against the reference;
    returns the rows of ``lsp.model.equivalence.compare``."""
    from lsp.parallel.topology import init_topology

    topo = init_topology(tp, cp, ep)
    ref = torch.load(path)
    rows = []
    for case in CASES:
        for method in (METHODS if cp > 1 else ("allscan",)):
            model, total = train_step(case, topo, method)
            rows += compare(case, method, model, total, ref[case], topo)
    return rows
