"""The packed-attention GPU check runs on the CPU too (math backend, float64), in one process
and on two gloo ranks, gathered and balanced; it reports a case that does not match."""

from __future__ import annotations

import json

import torch

from lsp.testing import run_ranks


def test_one_process(tmp_path):
    from lsp.launch.check_doc_attention import main

    assert main(["--out", str(tmp_path / "a.json"), "--skip", "time"]) == 0
    recs = json.loads((tmp_path / "a.json").read_text())["check"]
    assert len(recs) == 1 and recs[0]["ok"] and recs[0]["errs"]["dk"] < 1e-9


def _rank(rank, world):
    import torch.distributed as dist

    from lsp.launch.check_doc_attention import check

    rows = [[0, 1, 64, 65, 200, 668, 768], [0, 300, 768]]
    return [check(rows, 768, 16, torch.float64, "math", torch.device("cpu"), dist.group.WORLD,
                  balance) for balance in (False, True)]


def test_two_ranks():
    for gathered, balanced in run_ranks(_rank, 2):
        assert gathered["ok"] and balanced["ok"], (gathered, balanced)
        assert max(gathered["errs"].values()) < 1e-9 and len(balanced["errs"]) == 4
