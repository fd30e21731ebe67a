"""Short ``lsp-train`` runs shared by the training and kernel tests: the overrides and the loss
reader (importable from every test folder: pytest puts ``tests/``, where ``conftest.py`` lives,
on ``sys.path``)."""

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
