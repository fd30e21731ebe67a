"""Run a function on P simulated ranks: CPU processes in one gloo process group (the one spawner
of the test suite).

``run_ranks(fn, P, *args)`` starts P processes, initialises ``torch.distributed`` with the gloo
backend through a fresh file store, calls ``fn(rank, P, *args)`` on each and returns the list of
their return values in rank order. Return values travel serialised with ``torch.save`` (a tensor
put on a queue as is would be shared through a file descriptor of a process that may have exited).
An exception on any rank fails the caller with the tracebacks of the ranks that failed (after a
short grace period for the others to report); a rank that does not finish within ``timeout``
seconds (a hang) fails it too; stragglers are killed, so a broken collective cannot wedge the
suite.

``start="spawn"`` (default) starts clean interpreters (``fn`` and its module must be importable
by name, which they are from a test module: the child gets the parent's ``sys.path``).
``start="fork"`` reuses the parent's imports and starts in milliseconds, but is safe only in a
process with no other threads: once a test has trained in-process (a gloo process group leaves
its loop threads behind), a forked rank can deadlock or crash on the locks and objects it
inherits, as the full suite showed.
"""

from __future__ import annotations

import gc
import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

ERROR_GRACE_S = 3.0  # after a rank fails, how long the others get to report before being killed


def _entry(fn, rank, P, store_path, args, results, collective_timeout):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=P, timeout=timedelta(seconds=collective_timeout))
        out = fn(rank, P, *args)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, including assertion errors inside fn
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, P: int, *args, timeout: float = 300.0, collective_timeout: float = 120.0,
              start: str = "spawn"):
    """``[fn(0, P, *args), ..., fn(P-1, P, *args)]`` computed on P gloo ranks."""
    import torch

    ctx = mp.get_context(start)
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, P, store, args, results,
                                                  collective_timeout), daemon=True)
                 for r in range(P)]
        if start == "fork":
            # a forked rank inherits every object of this (long-lived test) process; were its
            # garbage collector to finalise one (a leftover process group, a trainer kept alive
            # by a stored traceback), the destructor would run without the threads it expects
            # and crash the rank: collect here, and freeze the rest out of the child's collector
            gc.collect()
            gc.freeze()
        try:
            for p in procs:
                p.start()
        finally:
            if start == "fork":
                gc.unfreeze()
        got: dict[int, tuple[str, object]] = {}
        exited: dict[int, float] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(got) < P:
                try:
                    rank, status, out = results.get(timeout=min(1.0, max(0.1, deadline -
                                                                         time.monotonic())))
                except queue.Empty:
                    if any(s == "error" for s, _ in got.values()) and \
                            time.monotonic() >= deadline:
                        break  # a rank failed; the rest are stuck in a collective
                    now = time.monotonic()
                    for r, p in enumerate(procs):  # exited: its result may still be in the pipe
                        if r not in got and p.exitcode is not None:
                            exited.setdefault(r, now)
                    dead = [r for r, t in exited.items() if r not in got and now - t > 2.0]
                    if dead:  # died without reporting (a signal, os._exit): fail now
                        for r in dead:
                            got[r] = ("error", f"rank {r} exited with code {procs[r].exitcode} "
                                               "without a result (negative: killed by that "
                                               "signal)")
                        deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
                        continue
                    if time.monotonic() < deadline:
                        continue
                    missing = sorted(set(range(P)) - set(got))
                    raise AssertionError(
                        f"ranks {missing} of {P} did not finish within {timeout}s (hang?)"
                    ) from None
                got[rank] = (status, out)
                if status == "error":
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        finally:
            for p in procs:
                p.join(timeout=2 if len(got) < P else 10)
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = {r: o for r, (s, o) in got.items() if s == "error"}
    if errors:
        missing = sorted(set(range(P)) - set(got))
        tail = f"\n(ranks {missing} were stopped after the failure)" if missing else ""
        raise AssertionError(
            "\n".join(f"--- rank {r} failed ---\n{tb}" for r, tb in sorted(errors.items())) + tail)
    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(P)]
