"""``train.profile_step``: torch.profiler over one whole optimizer step, written per rank."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class StepProfiler:
    """Profiles step ``step`` (1-based; None: never) into ``run_dir/profile_rank<r>.txt``: ops by
    device time, by CPU time and by memory allocated, and the step's peak memory; blocks appear
    as ``block<i>_<letter>`` ranges (recomputation shows as a second range of the same name)."""

    def __init__(self, step: int | None, run_dir: Path, rank: int, device: torch.device):
        self.step, self.run_dir, self.rank, self.device = step, run_dir, rank, device
        self.marks: list[str] = []
        self._prof = None

    @contextlib.contextmanager
    def around(self, step: int):
        """Profile the body when ``step`` is the profiled one."""
        if step != self.step:
            yield
            return
        self._start()
        try:
            yield
        finally:
            self._finish(step)

    def mark_forward(self, micro: int) -> None:
        """Memory after a micro-batch's forward (recorded only while profiling on a GPU)."""
        if self._prof is not None and self.device.type == "cuda":
            gib = 2**30
            self.marks.append(
                f"micro-batch {micro}: after forward "
                f"{torch.cuda.memory_allocated(self.device) / gib:.2f} GiB allocated, forward "
                f"peak {torch.cuda.max_memory_allocated(self.device) / gib:.2f} GiB")

    def _start(self) -> None:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.marks = [f"step start: {torch.cuda.memory_allocated(self.device) / 2**30:.2f} "
                          "GiB allocated (weights, gradients, optimizer state)"]
        self._prof = torch.profiler.profile(activities=acts, profile_memory=True)
        self._prof.__enter__()

    def _finish(self, step: int) -> None:
        device, prof = self.device, self._prof
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prof.__exit__(None, None, None)
        self._prof = None
        ka = prof.key_averages()
        dev_key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
        parts = [f"profile of step {step}, rank {self.rank}, device {device}"]
        if device.type == "cuda":
            parts += self.marks
            parts.append(
                f"peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB, "
                f"peak reserved {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB")
        mem_key = "self_device_memory_usage" if device.type == "cuda" else "self_cpu_memory_usage"
        for key, n in ((dev_key, 60), ("cpu_time_total", 30), (mem_key, 40)):
            try:
                parts.append(f"--- sorted by {key}\n" + ka.table(sort_by=key, row_limit=n,
                                                                   max_name_column_width=60))
            except Exception as e:  # a sort key this torch version lacks
                parts.append(f"--- sorted by {key}: unavailable ({e})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / f"profile_rank{self.rank}.txt").write_text("\n\n".join(parts))
        if self.rank == 0:
            print(f"profile of step {step} written to {self.run_dir}/profile_rank*.txt",
                  flush=True)
