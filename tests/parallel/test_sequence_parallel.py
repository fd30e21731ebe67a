"""Sequence parallelism on simulated CPU ranks (gloo) equals the one-process op, gradients too.

For P in {1, 2, 3, 4} one group of ranks runs every family x gate x method x initial state x
dtype (``sp_cases.py`` beside this file); each parametrized test below checks one of those
configurations.
"""

from __future__ import annotations

import pytest
import sp_cases

from lsp.testing import run_ranks

TOL = {"f64": 1e-9, "f32": 1e-5}
CONFIGS = sp_cases.configs()
IDS = [sp_cases.config_id(c) for c in CONFIGS]


def _merge(per_rank: list[dict]) -> dict:
    """Largest error over ranks, per configuration and quantity."""
    merged: dict = {}
    for res in per_rank:
        for cid, errs in res.items():
            m = merged.setdefault(cid, {})
            for n, e in errs.items():
                m[n] = max(m.get(n, 0.0), e) if e == e else float("nan")
    return merged


_cache: dict = {}


def results_for(P: int) -> dict:
    if P not in _cache:
        _cache[P] = _merge(run_ranks(sp_cases.run_configs, P, CONFIGS))
    return _cache[P]


def assert_close(errs: dict, tol: float, cid: str):
    expected = {"o", "S", "dq", "dk", "dv"}
    assert expected <= set(errs), f"{cid}: missing {expected - set(errs)}"
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"{cid}: relative errors above {tol}: {bad}"


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_matches_single_process(P, cfg):
    cid = sp_cases.config_id(cfg)
    errs = results_for(P)[cid]
    assert_close(errs, TOL[cfg["dtype"]], cid)
    if cfg["gate"] != "none":
        assert "dg" in errs
    if cfg["family"] == "delta_rule":
        assert "dbeta" in errs
    if cfg["with_state"]:
        assert "dinit" in errs


SUB = [c for c in CONFIGS if c["dtype"] == "f64" and c["with_state"]]


def test_interleaved_subgroups():
    """Groups {0,2} and {1,3} of a 4-rank world: point-to-point uses the right global ranks."""
    per_rank = run_ranks(sp_cases.run_interleaved_subgroups, 4, SUB)
    for cid, errs in _merge(per_rank).items():
        assert_close(errs, 1e-9, cid)


def test_allscan_block_counts():
    """Any block count works, including 1 (the ring), uneven splits and one per value column."""
    cfgs = [c for c in SUB if c["method"] == "allscan"]
    res = _merge(run_ranks(sp_cases.run_blocks, 3, cfgs, [1, 2, 3, 5]))
    assert len(res) == len(cfgs) * 4
    for cid, errs in res.items():
        assert_close(errs, 1e-9, cid)


def test_exchange_inside_the_kernels():
    """``backend="triton"`` (interpreter): the exchange inside the op, one segment per slice and
    three, both families, every gate and method, against the one-process float64 op."""
    cfgs = [dict(family=f, gate=g, method=m, with_state=s, dtype="f32")
            for f, g, m, s in (("delta_rule", "none", "allgather", True),
                               ("delta_rule", "head", "allscan", True),
                               ("delta_rule", "key", "ring", False),
                               ("linear_attention", "none", "ring", True),
                               ("linear_attention", "head", "allgather", False),
                               ("linear_attention", "key", "allscan", True))]
    res = _merge(run_ranks(sp_cases.run_on_kernels, 2, cfgs, [1, 3], start="spawn"))
    assert len(res) == len(cfgs) * 2
    for cid, errs in res.items():
        assert_close(errs, TOL["f32"], cid)
        assert ("dinit" in errs) == ("-init-" in cid), cid
        assert ("dbeta" in errs) == cid.startswith("delta_rule"), cid


def test_mismatches_raise_on_every_rank():
    per_rank = run_ranks(sp_cases.run_errors, 2)
    for rank, out in enumerate(per_rank):
        assert "disagree on method=[allscan, ring]" in out["method"], out["method"]
        assert "disagree on T_local=[4, 5]" in out["shard_length"], out["shard_length"]
        assert "K=[4, 5]" in out["head_dim"], out["head_dim"]
        assert "dtype=[float32, float64]" in out["dtype"], out["dtype"]
        assert "seq_len=9 does not match 2 ranks x 4 local tokens" in out["seq_len"]
        assert "method='zigzag' is unknown" in out["unknown_method"]
        assert "is not an lsp op" in out["not_an_op"]
        assert "v has shape [1, 5, 2, 3]" in out["bad_shard"]
        assert out["after"] == out["after"]  # a finite result: the group still works
    assert per_rank[0]["after"] == per_rank[1]["after"]  # the final state is replicated
