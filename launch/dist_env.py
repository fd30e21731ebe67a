"""Join a torch.distributed world from whatever started this process: torchrun or mpirun.

- torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``): ``env://`` rendezvous, multi-node included.
- mpirun / mpiexec (Open MPI, MPICH, Intel MPI): rank, world size and local rank come from MPI
  through mpi4py; rank 0 picks a free port on its host and broadcasts ``host:port`` over MPI.

The backend is NCCL when CUDA is available and gloo otherwise, unless named.
``spawn_gloo(fn, world, *args)`` is the no-launcher path of the benchmarks: it starts ``world``
gloo ranks on this machine and returns what ``fn`` returns on rank 0. ``spawn_ranks`` is the
supervised start ``lsp-train`` uses without a launcher: when a rank fails it ends the others and
names the rank that failed first; SIGINT / SIGTERM to the parent end every rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

_MPI_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


def launched_by_mpi() -> bool:
    return "RANK" not in os.environ and any(v in os.environ for v in _MPI_VARS)


def launched() -> bool:
    """True when a launcher (torchrun or mpirun) started this process."""
    return "RANK" in os.environ or launched_by_mpi()


def init_from_environment(backend: str = "auto", timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Initialise the default process group; returns ``(rank, world_size, local_rank)``."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        init = "env://"
    elif launched_by_mpi():
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        addr = None
        if rank == 0:
            host = socket.gethostname()
            with socket.socket() as s:
                s.bind(("", 0))
                addr = f"{socket.gethostbyname(host)}:{s.getsockname()[1]}"
        addr = comm.bcast(addr, root=0)
        init = f"tcp://{addr}"
    else:
        raise ValueError(
            "no launcher found: start with torchrun (sets RANK/WORLD_SIZE) or mpirun, "
            "or call the command without a launcher to let it spawn CPU ranks itself"
        )
    if backend == "nccl":
        torch.cuda.set_device(local)
        nccl_fail_fast()
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=timeout)
    return rank, world, local


def nccl_fail_fast() -> None:
    """Make NCCL collectives that outlast the process group's timeout tear the process down
    (torch's default since 2.2, set here unless the user chose otherwise): without it a
    collective whose peer is gone can wait for ever."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")


GRACE_S = 3.0
"""After a rank fails (or the parent is told to stop), how long the others get to exit on SIGTERM
before SIGKILL: a stopped (SIGSTOP) or wedged rank never handles SIGTERM."""


class RankFailed(RuntimeError):
    """A spawned rank failed; the message names the rank that failed first and its error."""


class _Stop(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _entry(rank, fn, args, errdir):
    """A spawned rank: ``fn(rank, *args)``; on failure it leaves the time and traceback in
    ``errdir`` for the parent, which reports the rank that failed first."""
    import traceback

    try:
        fn(rank, *args)
    except BaseException:
        path = os.path.join(errdir, f"rank{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"rank": rank, "time": time.time(), "error": traceback.format_exc()}, f)
        os.replace(path + ".tmp", path)
        raise


def _await_reporting_ranks(procs, errdir: str, grace_s: float) -> None:
    """Up to ``grace_s`` for the ranks that have reported an error but are still exiting (a
    peer may notice the broken connection and exit first): they end with their own status
    instead of the SIGTERM meant for the others."""
    deadline = time.monotonic() + grace_s
    for r, p in enumerate(procs):
        if p.exitcode is None and os.path.exists(os.path.join(errdir, f"rank{r}.json")):
            p.join(max(0.0, deadline - time.monotonic()))


def _end(procs, grace_s: float) -> None:
    """SIGTERM (and SIGCONT, so that a stopped rank can act on it) to every live rank, SIGKILL
    to those still alive after ``grace_s``."""
    for p in procs:
        if p.exitcode is None:
            for sig in (signal.SIGTERM, signal.SIGCONT):
                with _ignoring(ProcessLookupError):
                    os.kill(p.pid, sig)
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join()


class _ignoring:
    def __init__(self, *exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, typ, val, tb):
        return typ is not None and issubclass(typ, self.exc)


def _describe(code: int | None) -> str:
    from lsp.train.watchdog import DEADLINE_EXIT

    if code is None:
        return "did not finish"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code == DEADLINE_EXIT:
        return (f"exited with status {code}: a step outlasted parallel.timeout_s (its stacks are "
                "printed above)")
    return f"exited with status {code}"


def _failure(procs, order: list[int], errdir: str) -> RankFailed:
    errors = {}
    for name in os.listdir(errdir):
        if name.endswith(".json"):
            with open(os.path.join(errdir, name)) as f:
                e = json.load(f)
            errors[e["rank"]] = e
    # the first failure by the ranks' own clocks (a peer's "Connection closed by peer" follows
    # it); ranks that left no error (killed, deadline) in the order the parent saw them exit
    if errors:
        first = min(errors.values(), key=lambda e: e["time"])["rank"]
    else:
        first = order[0]
    others = [r for r in order if r != first]
    msg = f"rank {first} failed first: it {_describe(procs[first].exitcode)}"
    if others:
        msg += (f"; ranks {others} failed or were stopped after it (a peer's 'Connection closed "
                "by peer' or timeout is a consequence)")
    if first in errors:
        msg += f". Rank {first}'s error:\n{errors[first]['error']}"
    return RankFailed(msg)


def spawn_ranks(fn, world: int, args: tuple = (), grace_s: float = GRACE_S) -> None:
    """Run ``fn(rank, *args)`` on ``world`` processes started with torch.multiprocessing and
    supervise them (hand-written: ``ProcessContext.join`` neither orders failures nor stops on a
    signal to the parent).

    - all exit 0: return;
    - one fails: SIGTERM the others, SIGKILL after ``grace_s``, raise :class:`RankFailed`
      naming the rank that failed first and its traceback;
    - SIGINT / SIGTERM to this process: the same to every rank, then ``SystemExit`` with
      130 (SIGINT) or 143 (SIGTERM), as a shell reports a process ended by that signal.
    """
    import multiprocessing.connection

    import torch.multiprocessing as mp

    handlers = {}

    def stop(signum, frame):
        raise _Stop(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    procs = []
    with tempfile.TemporaryDirectory() as errdir:
        try:
            if main_thread:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    handlers[sig] = signal.signal(sig, stop)
            ctx = mp.start_processes(_entry, args=(fn, args, errdir), nprocs=world, join=False,
                                     start_method="spawn")
            procs = ctx.processes
            print(f"lsp-train: ranks 0..{world - 1} are pids {[p.pid for p in procs]}",
                  file=sys.stderr, flush=True)
            order: list[int] = []
            while True:
                for r, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and r not in order:
                        order.append(r)
                if order:
                    _await_reporting_ranks(procs, errdir, grace_s)
                    _end(procs, grace_s)
                    for r, p in enumerate(procs):
                        if p.exitcode != 0 and r not in order:
                            order.append(r)
                    raise _failure(procs, order, errdir)
                live = [p.sentinel for p in procs if p.exitcode is None]
                if not live:
                    return
                multiprocessing.connection.wait(live, timeout=1.0)
        except _Stop as stop_signal:
            print(f"lsp-train: {signal.Signals(stop_signal.signum).name}: stopping every rank",
                  file=sys.stderr, flush=True)
            _end(procs, grace_s)
            raise SystemExit(128 + stop_signal.signum) from None
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if procs and any(p.exitcode is None for p in procs):  # e.g. a KeyboardInterrupt
                _end(procs, grace_s)


def _spawned(rank, world, store, result, fn, args):
    from lsp.launch.train import quiet_library_warnings

    quiet_library_warnings()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = fn(*args)
        if rank == 0:
            with open(result, "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, world: int, *args):
    """Run ``fn(*args)`` on ``world`` spawned gloo ranks; return rank 0's (JSON-able) result."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        mp.spawn(_spawned, args=(world, os.path.join(tmp, "store"), result, fn, args),
                 nprocs=world)
        with open(result) as f:
            return json.load(f)
