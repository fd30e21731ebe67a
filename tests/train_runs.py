"""Short ``lsp-train`` runs shared by the training and kernel tests: the overrides, the loss
reader and :func:`train_on_forked_ranks` (importable from every test folder: pytest puts
``tests/``, where ``conftest.py`` lives, on ``sys.path``)."""

from __future__ import annotations

import json
from pathlib import Path

FAST = ["data.max_bytes=1000000", "train.log_interval=1", "train.resume=auto"]

# five steps of a small model: the layout-equivalence runs
LAYOUT_ARGS = FAST + ["train.steps=5", "train.seq_len=64", "train.micro_batch=2"]

# the 1M-context experiment's memory options (activation checkpointing with attention outputs
# kept, MoM one memory at a time, recomputed convolutions)
CKPT = ["parallel.activation_checkpointing=true", "model.mom_memory_checkpointing=true",
        "model.conv_checkpointing=true"]


def losses(run_dir: Path) -> list[float]:
    """The loss of every logged step of a run, from its ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def _train_rank(rank: int, world: int, run) -> None:
    from lsp.launch.train import quiet_library_warnings
    from lsp.train.loop import train

    quiet_library_warnings()
    train(run, run.resolve(world))


def train_on_forked_ranks(overrides: list[str], timeout: float = 500.0) -> None:
    """The training ``lsp-train overrides`` runs, on ranks that ``lsp.testing.run_ranks`` forks
    from this process (one gloo group of ``parallel.nproc`` or tp*cp ranks): the launcher's
    spawned ranks import torch and megatron again, seconds of CPU each. For the runs whose
    losses a test compares; the launcher itself (its start, lock, supervision and errors) is
    tested through ``lsp.launch.train.main``."""
    from lsp.launch.train import load_run
    from lsp.testing import run_ranks

    run = load_run(list(overrides))
    run_ranks(_train_rank, run.parallel.nproc or run.parallel.tp * run.parallel.cp, run,
              timeout=timeout)
