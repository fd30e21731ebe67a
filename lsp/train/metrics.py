"""Run logging on rank 0: a progress line, TensorBoard scalars and ``metrics.jsonl``.

Every logged step writes the same fields to TensorBoard (``train/<field>``) and as one JSON line
to ``<run_dir>/metrics.jsonl``. The file holds one row per step: a run resumed from step ``N``
first drops the rows after ``N`` (steps a crashed run logged past its last checkpoint, which the
resumed run replays), then appends, so its lines continue the uninterrupted run's; TensorBoard's
``purge_step`` does the same for the events.
"""

from __future__ import annotations

import json
import os
import sys


class RunLogger:
    """Rank-0 logger; on other ranks every method is a no-op."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True,
                 resume_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"),
                                        purge_step=resume_step + 1)
        path = os.path.join(run_dir, "metrics.jsonl")
        _drop_rows_after(path, resume_step)
        self.jsonl = open(path, "a", buffering=1)

    def log(self, step: int, fields: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **fields}
        self.jsonl.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in fields.items():
                if isinstance(v, (int, float)) and v == v:
                    self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        parts = [f"step {step:>6}"]
        for k in ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu", "exchange_share",
                  "peak_mem_gb", "peak_mem_gb_per_rank", "accuracy", "valid_loss"):
            if k in fields and fields[k] is not None:
                v = fields[k]
                parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrite ``path`` (atomically) without the rows of steps after ``step``, if it has any."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash mid-write
        if row_step <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
