"""Run a function on P simulated ranks: spawned CPU processes in one gloo process group.

``run_ranks(fn, P, *args)`` starts P processes, initialises ``torch.distributed`` with the gloo
backend through a fresh file store, calls ``fn(rank, P, *args)`` on each and returns the list of
their return values in rank order. An exception on any rank, or a rank that does not finish
within ``timeout`` seconds (a hang), fails the caller with the ranks' tracebacks; stragglers are
killed, so a broken collective cannot wedge the test suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from datetime import timedelta


def _entry(fn, rank, P, store_path, args, results, collective_timeout):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=P, timeout=timedelta(seconds=collective_timeout))
        out = fn(rank, P, *args)
        results.put((rank, "ok", out))
    except BaseException:  # report everything, including assertion errors inside fn
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, P: int, *args, timeout: float = 240.0, collective_timeout: float = 60.0):
    """``[fn(0, P, *args), ..., fn(P-1, P, *args)]`` computed on P gloo ranks."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, P, store, args, results,
                                                  collective_timeout), daemon=True)
                 for r in range(P)]
        for p in procs:
            p.start()
        got: dict[int, tuple[str, object]] = {}
        try:
            while len(got) < P:
                rank, status, out = results.get(timeout=timeout)
                got[rank] = (status, out)
        except queue.Empty:
            missing = sorted(set(range(P)) - set(got))
            errors = {r: o for r, (s, o) in got.items() if s == "error"}
            raise AssertionError(
                f"ranks {missing} of {P} did not finish within {timeout}s (hang?); "
                f"errors on other ranks: {errors}"
            ) from None
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    errors = {r: o for r, (s, o) in got.items() if s == "error"}
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [got[r][1] for r in range(P)]
