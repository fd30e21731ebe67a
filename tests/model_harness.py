"""Spawned gloo ranks for the layer, model and topology tests (CPU, fp32).

``run_ranks(fn, world_size, *args)`` forks ``world_size`` processes (fork: the parent has
already imported torch and megatron, so a rank starts in milliseconds), initialises a gloo
process group in each, calls ``fn(rank, world_size, *args)`` and returns the list of results in
rank order. An exception on any rank fails the call with that rank's traceback; the other ranks
are terminated rather than left waiting in a collective.

Also: the model configs and layouts of the equivalence tests, the one-process reference run and
the per-layout comparison, shared by tests/test_model_layouts.py.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported here so that forked ranks inherit them instead of importing megatron each.
import lsp.layers  # noqa: F401
import lsp.model  # noqa: F401
import lsp.parallel.topology  # noqa: F401

RANK_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, results, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=RANK_TIMEOUT_S))
        out = fn(rank, world, *args)
        # Serialised to bytes here: a tensor put on the queue as is would be shared through a
        # file descriptor that the parent fetches from this process, which may have exited.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 300):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks; see module doc."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, results, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(out))} did not "
                                   f"finish within {timeout} s") from None
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
    return [out[r] for r in range(world_size)]


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

__all__ = ["run_ranks", "free_port", "reference_rank", "layout_rank", "BASE", "CASES", "LAYOUTS",
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
