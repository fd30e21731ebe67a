"""``lsp-train`` / ``python -m lsp.launch.train``: the training entry point.

    lsp-train                                   # CPU demo: spawns 2 gloo ranks itself (CP=2)
    lsp-train experiment=mqar train.steps=300   # Hydra overrides, as Hydra users expect
    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint host:port \\
        -m lsp.launch.train experiment=1m_context_2gpu
    mpirun -n 2 lsp-train parallel.cp=2

Configuration is composed with Hydra's compose API from the ``configs/`` groups (installed as
``lsp.configs``) into a typed ``lsp.train.config.RunConfig``, validated once before any process
starts (a mistake prints one line and exits with status 2); spawned ranks receive that object,
and rank 0 writes it to ``<run_dir>/config.yaml``. Under torchrun or mpirun the process joins the
launcher's world (``lsp.launch.dist_env``). Without a launcher, ``lsp-train`` starts
``parallel.nproc`` processes itself (default ``tp * cp``) on this machine: gloo ranks on CPU,
or one NCCL rank per GPU when CUDA is present.
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import timedelta


def quiet_library_warnings() -> None:
    """Silence import-time notices of megatron-core (no Transformer Engine / Apex: it falls back
    to torch, as lsp intends) and torch's renamed-collective notices, which drown the log."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.distributed.*deprecated.*")


def train_launched_rank(train, cfg) -> None:
    """Run ``train(cfg)`` on a rank started by torchrun or mpirun; a rank that fails prints its
    traceback and exits with status 1 at once.

    It must not go on to ``destroy_process_group``: under NCCL that waits for peers which are
    blocked in a collective this rank will never join, so the run hangs and the error is never
    printed (a CUDA out-of-memory on one rank looked like a silent stall this way). torchrun and
    mpirun stop the other ranks when one exits non-zero.
    """
    import traceback

    try:
        train(cfg)
    except BaseException:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        print(f"lsp-train: rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        text = str(sys.exc_info()[1])
        if "Connection closed by peer" in text or "Connection reset by peer" in text:
            print(f"lsp-train: rank {rank}: a peer rank failed or was stopped first (the lost "
                  "connection is a consequence); its error is the first 'rank N failed' in the "
                  "job's log", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _train_locked_on_rank0(run, layout):
    """Under torchrun / mpirun: rank 0 holds the run directory's lock for the run."""
    import contextlib

    import torch.distributed as dist

    from lsp.train.loop import train
    from lsp.train.rundir import RunDirLock

    lock = RunDirLock(run.run_dir).acquire() if dist.get_rank() == 0 else contextlib.nullcontext()
    with lock:
        return train(run, layout)


class ConfigError(ValueError):
    """A user's configuration mistake; :func:`main` prints its one line and exits with status 2
    (as argparse does), with no traceback."""


def load_run(overrides: list[str]):
    """The validated ``RunConfig`` for command-line overrides; a mistake raises
    :class:`ConfigError` with one line that names the value and the fix."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lsp.train.config import load_config

    try:
        return load_config(overrides)
    except ValueError as e:
        raise ConfigError(_error_line(e)) from e
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_error_line(e)) from e


def _error_line(e: BaseException) -> str:
    """The error and the causes Hydra / OmegaConf wrap it in, as one line."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if first not in parts and "$VALUE" not in first and not any(first in p for p in parts):
            parts.append(first)
        e = e.__cause__ or e.__context__
    return "lsp-train: config error: " + ": ".join(parts)


def compose(overrides: list[str]):
    """The composed Hydra tree (before validation), as ``lsp.train.config.compose``."""
    from lsp.train.config import compose as _compose

    return _compose(overrides)


def _run_rank(rank: int, world: int, store: str, run, backend: str) -> None:
    quiet_library_warnings()
    import torch
    import torch.distributed as dist

    from lsp.train.loop import train

    if backend == "nccl":
        from lsp.launch.dist_env import nccl_fail_fast

        torch.cuda.set_device(rank)
        nccl_fail_fast()
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=run.parallel.timeout_s))
    try:
        train(run, run.resolve(world))
    finally:
        dist.destroy_process_group()


def _checked_layout(run, world: int):
    """The run's layout for ``world`` ranks and the checks that need no process: a mistake is
    a :class:`ConfigError`."""
    from lsp.train.config import check_run_dir

    try:
        layout = run.resolve(world)
        check_run_dir(run.run_dir)
    except ValueError as e:
        raise ConfigError(_error_line(e)) from e
    return layout


def main(argv: list[str] | None = None) -> None:
    """``lsp-train [overrides]``; a configuration mistake prints one line and exits with 2."""
    try:
        run_cli(argv)
    except ConfigError as e:
        print(e, file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run_cli(argv: list[str] | None = None) -> None:
    """:func:`main` without the exit: a configuration mistake raises :class:`ConfigError`."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    if overrides and overrides[0] in ("-h", "--help"):
        from lsp.train.config import config_dir

        print(__doc__)
        print(f"config groups: {config_dir()}")
        return
    quiet_library_warnings()
    run = load_run(overrides)  # every config error here, before any process starts
    from lsp.launch.dist_env import init_from_environment, launched

    if launched():
        import torch.distributed as dist

        from lsp.train.loop import train

        init_from_environment(run.parallel.dist_backend, timeout_s=run.parallel.timeout_s)
        layout = _checked_layout(run, dist.get_world_size())
        train_launched_rank(lambda r: _train_locked_on_rank0(r, layout), run)
        dist.destroy_process_group()
        return

    import torch

    backend = run.dist_backend
    world = run.parallel.nproc or run.parallel.tp * run.parallel.cp
    _checked_layout(run, world)
    if backend == "nccl" and world > torch.cuda.device_count():
        raise ConfigError(f"lsp-train: config error: parallel.nproc={world} ranks but only "
                          f"{torch.cuda.device_count()} GPUs; use torchrun across nodes or "
                          "lower tp*cp")
    from lsp.launch.dist_env import spawn_ranks

    with _locked(run.run_dir), tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        if world == 1:
            _run_rank(0, 1, store, run, backend)
        else:
            spawn_ranks(_run_rank, world, (world, store, run, backend))


def _locked(run_dir: str):
    """The run directory's lock for this run (one run per run directory); another run holding
    it is a :class:`ConfigError` that names that run."""
    from lsp.train.rundir import RunDirLock

    try:
        return RunDirLock(run_dir).acquire()
    except ValueError as e:
        raise ConfigError(f"lsp-train: config error: {e}") from e


if __name__ == "__main__":
    main()
