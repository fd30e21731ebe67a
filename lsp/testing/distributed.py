"""Run a function on P simulated ranks: CPU processes in one gloo process group (the one spawner
of the test suite), or in one child process without a group.

``run_ranks(fn, P, *args)`` starts P processes, initialises ``torch.distributed`` with the gloo
backend through a fresh file store, calls ``fn(rank, P, *args)`` on each and returns the list of
their return values in rank order. Return values travel serialised with ``torch.save`` (a tensor
put on a queue as is would be shared through a file descriptor of a process that may have exited).
An exception on any rank fails the caller with the tracebacks of the ranks that failed (after a
short grace period for the others to report); a rank that does not finish within ``timeout``
seconds (a hang) fails it too; stragglers are killed, so a broken collective cannot wedge the
suite.

``run_in_child(fn, *args)`` returns ``fn(*args)`` computed in one forked process and re-raises
its exception (same type and message, the child's traceback as a note): the way for a test to
train in-process (``lsp.launch.train.main`` on one rank initialises gloo in the calling process)
or to create a process group, without leaving that group's threads in the test process.

The rule: the pytest process never holds a process group. ``start="fork"`` (default) then
reuses the parent's imports (torch, megatron) and starts a rank in milliseconds, where a spawned
rank imports them again (seconds of CPU per rank). A forked rank inherits the parent's locks and
objects: were a gloo group's loop threads running in the parent, the rank could deadlock or
crash on them, so forking from a process that holds a group or gloo threads fails at once,
naming them (``check_fork_safe``). A forked child computes on one intra-op thread, whatever it
asks for: libgomp's thread pool does not survive a fork, and a child's parallel region on more
threads would wait forever for the parent's. ``start="spawn"`` starts a clean interpreter
(``fn`` and its module must be importable by name, which they are from a test module: the child
gets the parent's ``sys.path``); use it only for a test that needs one (a module-level state the
parent has already set, such as Triton's interpreter decision).
"""

from __future__ import annotations

import gc
import io
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from datetime import timedelta

ERROR_GRACE_S = 3.0  # after a rank fails, how long the others get to report before being killed
GLOO_THREADS = ("gloo", "pt_gloo")  # name prefixes of gloo's loop and work threads (Linux comm)


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads (Linux; elsewhere an empty list)."""
    names = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return names
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread has ended meanwhile
            continue
        if name.startswith(GLOO_THREADS):
            names.append(name)
    return sorted(names)


def process_groups_held(collect: bool = True) -> list[str]:
    """What of ``torch.distributed`` this process holds: an initialised default group, gloo
    threads (a destroyed group's subgroups keep theirs until their last reference goes, hence
    the garbage collection first unless ``collect=False``); empty when it holds nothing."""
    import torch.distributed as dist

    if collect:
        gc.collect()
    held = []
    if dist.is_available() and dist.is_initialized():
        held.append("an initialised default process group")
    threads = gloo_threads()
    if threads:
        held.append(f"{len(threads)} gloo threads ({', '.join(sorted(set(threads)))})")
    return held


def check_fork_safe() -> None:
    """Raise ``RuntimeError`` if this process holds a process group or gloo threads: a forked
    child would inherit their locks mid-use and could deadlock or crash."""
    held = process_groups_held()
    if held:
        raise RuntimeError(
            f"cannot fork test ranks: this process holds {' and '.join(held)}; a forked child "
            "would inherit their locks. Train or create process groups only in a child "
            "(lsp.testing.run_in_child, run_ranks), or destroy the group and drop every "
            "reference to its subgroups; start='spawn' avoids the fork")


def _one_thread() -> None:
    """Pin this (forked) child to one intra-op thread, whatever the code it runs asks for
    (``lsp-train`` asks for cores // world): it inherits libgomp's thread pool from the parent
    without the pool's threads, and its first parallel region on more than one thread waits for
    them forever."""
    import torch

    torch.set_num_threads(1)
    torch.set_num_threads = lambda n: None


def _entry(fn, rank, P, store_path, args, results, collective_timeout):
    import torch
    import torch.distributed as dist

    _one_thread()  # spawned too: P ranks share this machine's cores
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


def _start(procs, start: str) -> None:
    if start == "fork":
        check_fork_safe()
        # a forked child inherits every object of this (long-lived test) process; were its
        # garbage collector to finalise one, the destructor would run without the threads it
        # expects: freeze them out of the child's collector (check_fork_safe has collected)
        gc.freeze()
    try:
        for p in procs:
            p.start()
    finally:
        if start == "fork":
            gc.unfreeze()


def run_ranks(fn, P: int, *args, timeout: float = 300.0, collective_timeout: float = 120.0,
              start: str = "fork"):
    """``[fn(0, P, *args), ..., fn(P-1, P, *args)]`` computed on P gloo ranks."""
    import torch

    ctx = mp.get_context(start)
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, P, store, args, results,
                                                  collective_timeout), daemon=True)
                 for r in range(P)]
        _start(procs, start)
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


def _child_entry(fn, args, results):
    _one_thread()
    try:
        out = ("ok", pickle.dumps(fn(*args)))
    except BaseException as e:  # SystemExit too: main() exits with 2 on a config error
        tb = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(e))
            out = ("raised", pickle.dumps(e), tb)
        except Exception:  # an exception type that does not round-trip through pickle
            out = ("error", f"{type(e).__name__}: {e}", tb)
    results.put(out)


def run_in_child(fn, *args, timeout: float = 300.0):
    """``fn(*args)`` computed in one forked process (no process group is set up for it); its
    exception is raised here with the child's traceback as a note (an exception that pickle
    cannot rebuild comes back as a ``RuntimeError`` with its type and message)."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    proc = ctx.Process(target=_child_entry, args=(fn, args, results))  # it may start ranks
    _start([proc], "fork")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                out = results.get(timeout=0.5)
                break
            except queue.Empty:
                if proc.exitcode is not None:  # its result may still be in the pipe
                    try:
                        out = results.get(timeout=1.0)
                        break
                    except queue.Empty:
                        raise AssertionError(f"the child exited with code {proc.exitcode} "
                                             "without a result (negative: killed by that "
                                             "signal)") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"the child did not finish within {timeout}s "
                                         "(hang?)") from None
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if out[0] == "ok":
        return pickle.loads(out[1])
    err = pickle.loads(out[1]) if out[0] == "raised" else RuntimeError(out[1])
    err.add_note(f"--- raised in the child process ---\n{out[2]}")
    raise err
