"""``lsp-train`` / ``python -m lsp.launch.train``: the training entry point.

    lsp-train                                   # CPU demo: spawns 2 gloo ranks itself (CP=2)
    lsp-train experiment=mqar train.steps=300   # Hydra overrides, as Hydra users expect
    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint host:port \\
        -m lsp.launch.train experiment=1m_context_2gpu
    mpirun -n 2 lsp-train parallel.cp=2

Configuration is composed with Hydra's compose API from the ``configs/`` groups (installed as
``lsp.configs``), so every rank and every launcher sees the same config; the resolved config is
written to ``<run_dir>/config.yaml`` by rank 0. Under torchrun or mpirun the process joins the
launcher's world (``lsp.launch.dist_env``). Without a launcher, ``lsp-train`` starts
``parallel.nproc`` processes itself (default ``tp * cp``) on this machine: gloo ranks on CPU,
or one NCCL rank per GPU when CUDA is present.
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import timedelta
from importlib import resources


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
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def config_dir() -> str:
    return str(resources.files("lsp.configs"))


def compose(overrides: list[str]):
    """The resolved config for these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def _run_rank(rank: int, world: int, store: str, overrides: list[str], backend: str,
              timeout_s: float) -> None:
    quiet_library_warnings()
    import torch
    import torch.distributed as dist

    from lsp.train.loop import train

    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        train(compose(overrides))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if overrides and overrides[0] in ("-h", "--help"):
        print(__doc__)
        print(f"config groups: {config_dir()}")
        return
    quiet_library_warnings()
    cfg = compose(overrides)  # config errors surface here, before any process starts
    par = cfg.parallel
    from lsp.launch.dist_env import init_from_environment, launched

    if launched():
        import torch.distributed as dist

        from lsp.train.loop import train

        init_from_environment(par.dist_backend, timeout_s=par.timeout_s)
        train_launched_rank(train, cfg)
        dist.destroy_process_group()
        return

    import torch

    backend = par.dist_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    world = par.nproc or par.tp * par.cp
    from lsp.train.loop import validate_config

    validate_config(cfg, world)  # every config error before any process starts
    if backend == "nccl" and world > torch.cuda.device_count():
        raise ValueError(f"parallel.nproc={world} ranks but only {torch.cuda.device_count()} GPUs; "
                         "use torchrun across nodes or lower tp*cp")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        if world == 1:
            _run_rank(0, 1, store, overrides, backend, par.timeout_s)
        else:
            mp.spawn(_run_rank, args=(world, store, overrides, backend, par.timeout_s),
                     nprocs=world, join=True)


if __name__ == "__main__":
    main()
