"""Join a torch.distributed world from whatever started this process: torchrun or mpirun.

- torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``): ``env://`` rendezvous, multi-node included.
- mpirun / mpiexec (Open MPI, MPICH, Intel MPI): rank, world size and local rank come from MPI
  through mpi4py; rank 0 picks a free port on its host and broadcasts ``host:port`` over MPI.

The backend is NCCL when CUDA is available and gloo otherwise, unless named.
``spawn_gloo(fn, world, *args)`` is the no-launcher path of the benchmarks: it starts ``world``
gloo ranks on this machine and returns what ``fn`` returns on rank 0.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
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
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=timeout)
    return rank, world, local


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
