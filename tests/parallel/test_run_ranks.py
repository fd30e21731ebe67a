"""The test spawner itself (``lsp.testing.distributed``): forking ranks from a process that holds a
gloo group fails at once and names what it holds; ``run_in_child`` returns and re-raises."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from lsp.testing import run_in_child, run_ranks
from lsp.testing.distributed import gloo_threads


def _rank_value(rank, world):
    return torch.full((2,), float(rank + world))


def _fork_with_a_group_held(store):
    """In a child: run_ranks with the default group held, then with only a subgroup left after
    destroying it, then with nothing held; the two refusals' messages and the last result."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    sub = dist.new_group([0])
    dist.all_reduce(torch.ones(2), group=sub)
    msgs = []
    with pytest.raises(RuntimeError) as e:
        run_ranks(_rank_value, 1)
    msgs.append(str(e.value))
    dist.destroy_process_group()
    with pytest.raises(RuntimeError) as e:
        run_ranks(_rank_value, 1)
    msgs.append(str(e.value))
    del sub, e  # the subgroup's threads go with its last reference
    return msgs, gloo_threads(), run_ranks(_rank_value, 2)


def test_forking_ranks_from_a_process_with_a_gloo_group_fails_clearly(tmp_path):
    (held, after_destroy), threads, out = run_in_child(_fork_with_a_group_held,
                                                       str(tmp_path / "store"))
    assert "cannot fork test ranks" in held and "initialised default process group" in held
    assert "gloo threads" in held and "run_in_child" in held
    assert "default process group" not in after_destroy and "gloo threads" in after_destroy
    assert threads == [] and [t.tolist() for t in out] == [[2.0, 2.0], [3.0, 3.0]]


def test_run_in_child_returns_and_reraises():
    parent = os.getpid()
    assert run_in_child(lambda a, b: (os.getpid() != parent, a + b), 2, 3) == (True, 5)

    def bad(value):
        raise ValueError(f"value={value} is bad; use 1")
    with pytest.raises(ValueError, match=r"value=7 is bad; use 1") as e:
        run_in_child(bad, 7)
    assert any("raised in the child process" in n and "in bad" in n for n in e.value.__notes__)
    with pytest.raises(SystemExit) as e:
        run_in_child(sys.exit, 2)
    assert e.value.code == 2


def test_run_in_child_reports_a_child_that_dies():
    with pytest.raises(AssertionError, match="exited with code -9 without a result"):
        run_in_child(lambda: os.kill(os.getpid(), 9))


def _matmul_on_two_threads():
    torch.set_num_threads(2)  # what lsp-train asks for on one rank of a 2-core machine
    a = torch.randn(512, 512)
    return torch.get_num_threads(), float((a @ a).sum())


def test_a_forked_child_asking_for_threads_does_not_hang():
    """libgomp's pool, used here before the fork, has no threads in the child: a parallel region
    there on 2 threads would wait forever (as in-process lsp-train runs did)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        a = torch.randn(512, 512)
        _ = a @ a  # this process's OpenMP team exists now
    finally:
        torch.set_num_threads(before)
    threads, total = run_in_child(_matmul_on_two_threads, timeout=60)
    assert threads == 1 and total == total
