"""The step meter: step time, tokens/s, MFU, state-exchange share and peak memory per rank."""

from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

from lsp.parallel.sequence import ExchangeTimer
from lsp.train.flops import peak_tflops, train_flops_per_token


def peak_mem_gb(device: torch.device) -> float:
    """GPU peak allocated (GiB), or the host's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_mem_per_rank(device: torch.device) -> list[float]:
    """Every rank's peak memory (GiB), gathered: under CP the ranks differ (the last rank's
    softmax attention sees the most keys), and the target is per GPU. A collective."""
    mine = torch.tensor([peak_mem_gb(device)], dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [round(float(t), 3) for t in parts]


class StepMeter:
    """Measures the steps between two log lines. ``exchange_timer`` is handed to the layers
    (``ParallelContext``) when the run has CP > 1, else None."""

    def __init__(self, model_cfg, seq_len: int, tokens_per_step: int, world: int,
                 device: torch.device, cp: int):
        self.device, self.world = device, world
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = train_flops_per_token(model_cfg, seq_len)
        self.peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" \
            else None
        self.exchange_timer = ExchangeTimer() if cp > 1 else None
        self.restart()

    def restart(self) -> None:
        """Start a new measurement window (after a log line, or after a checkpoint save)."""
        self._t0, self._steps = time.perf_counter(), 0
        if self.exchange_timer is not None:
            self.exchange_timer.reset()

    def step_done(self) -> None:
        self._steps += 1

    def row(self) -> dict:
        """The window's averages; a collective (peak memory of every rank)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step_time = (time.perf_counter() - self._t0) / max(self._steps, 1)
        tps = self.tokens_per_step / step_time
        exch = 0.0
        if self.exchange_timer is not None:
            exch = self.exchange_timer.seconds() / max(self._steps, 1) / step_time
        per_rank = peak_mem_per_rank(self.device)
        return {"step_time_s": step_time, "tokens_per_s": tps,
                "mfu": None if self.peak is None
                else tps * self.flops_per_token / (self.peak * 1e12 * self.world),
                "exchange_share": exch,
                "peak_mem_gb": max(per_rank), "peak_mem_gb_per_rank": per_rank}
