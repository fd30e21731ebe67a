"""Run logging on rank 0: a progress line, TensorBoard scalars and ``metrics.jsonl``.

Every logged step writes the same fields to TensorBoard (``train/<field>``) and as one JSON line
to ``<run_dir>/metrics.jsonl``; the file is appended to on resume, so a resumed run's lines
continue the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import sys


class RunLogger:
    """Rank-0 logger; on other ranks every method is a no-op."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)

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
