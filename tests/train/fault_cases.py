"""Rank functions for tests/train/test_faults.py (importable by ranks that torch.multiprocessing
spawns)."""

from __future__ import annotations

from datetime import timedelta


def bad_input_on_rank1(rank: int, world: int, store: str) -> None:
    """Rank 1 refuses its input before a collective; rank 0 waits in it for rank 1."""
    import time

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    if rank == 1:
        time.sleep(0.5)  # rank 0 is in the collective by now
        raise ValueError("bad input on rank 1 only: g has 1 positive entries")
    dist.all_reduce(torch.ones(4))
