"""Packed documents (``cu_seqlens``) under sequence parallelism on simulated CPU ranks (gloo).

Every rank passes the global offsets and the initial states of all documents; outputs, the
per-document final states and every gradient (initial states included, summed over ranks) must
equal the one-process packed op (tests/sp_varlen_cases.py). Layouts: boundaries on rank edges,
inside every shard (with one-token documents), a document longer than a shard, many one-token
documents, and a single document over all ranks.
"""

from __future__ import annotations

import pytest
import sp_varlen_cases as cases
from lsp.testing import run_ranks

TOL = {"f64": 1e-9, "f32": 1e-5}
CONFIGS = cases.configs()


def _plan(P):
    """(configuration, layouts) per group size; the full matrix at P = 4, slices elsewhere."""
    if P == 4:
        return [(c, ["inside", "long"] + (["tiny", "rank_edges", "whole"]
                                          if c["method"] == "allscan" else []))
                for c in CONFIGS if c["dtype"] == "f64"]
    if P == 2:
        return [(c, ["inside"]) for c in CONFIGS if c["dtype"] == "f32"]
    if P == 3:
        return [(c, ["inside", "long"]) for c in CONFIGS
                if c["dtype"] == "f64" and c["method"] == "ring"]
    return [(c, ["tiny", "whole"]) for c in CONFIGS
            if c["dtype"] == "f64" and c["method"] == "allgather"]


_cache: dict = {}


def _run(P: int) -> list[dict]:
    if P not in _cache:
        _cache[P] = run_ranks(cases.run_packed_and_checks, P, _plan(P), 6)
    return _cache[P]


def results_for(P: int) -> dict:
    merged: dict = {}
    for res in _run(P):
        for cid, errs in res["packed"].items():
            m = merged.setdefault(cid, {})
            for n, e in errs.items():
                m[n] = max(m.get(n, 0.0), e) if e == e else float("nan")
    return merged


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_packed_sequence_parallel_matches_one_process(P):
    res = results_for(P)
    expected = {f"{cases.config_id(c)}-{name}" for c, names in _plan(P) for name in names}
    assert set(res) == expected
    bad = {}
    for cid, errs in res.items():
        need = {"o", "S", "dq", "dk", "dv"} | ({"dg"} if "-none-" not in cid else set()) \
            | ({"dbeta"} if cid.startswith("delta_rule") else set()) \
            | ({"dinit"} if "rank_edges" not in cid or "f32" in cid else set())
        assert need <= set(errs), f"{cid}: missing {need - set(errs)}"
        tol = TOL[cid.rsplit("-", 2)[-2]]
        bad.update({f"{cid}:{n}": e for n, e in errs.items() if not e <= tol})
    assert not bad, f"relative errors above tolerance: {bad}"


def test_bad_offsets_raise_on_every_rank():
    for out in (r["errors"] for r in _run(2)):
        assert "cu_seqlens ends at 4 but the global sequence (2 ranks x 4) has T=8" \
            in out["local_end"], out["local_end"]
        assert "not strictly increasing" in out["not_increasing"]
        assert "initial_state has shape [1, 2, 3, 3]; with cu_seqlens of 2 documents" \
            in out["state_shape"]
        assert "disagree on" in out["offsets_differ"] and "offsets_digest" in out["offsets_differ"]


def test_packed_differs_from_unpacked():
    """The reset is visible: a packed run differs from the one-document run on the tokens after
    a boundary (a guard against a reference that would leak as well)."""
    for r in _run(2):
        assert r["leak"]["packed_vs_whole"] > 1e-3


def test_packed_whole_document_on_the_kernels_three_ranks():
    """One document over three ranks on the kernels: every shard runs with the exchange inside
    the op, the middle one with no final state of its own, the last returning the document's."""
    res = run_ranks(cases.run_packed_on_kernels, 3, 6, "whole", start="spawn")
    for r in res:
        assert len(r) == 2
        for cid, errs in r.items():
            assert errs.pop("wide_passes") == 0, cid
            bad = {n: e for n, e in errs.items() if not e <= TOL["f32"]}
            assert {"o", "S", "dq", "dk", "dv", "dinit"} <= set(errs) and not bad, (cid, bad)


def test_packed_sequence_parallel_on_the_kernels():
    """``backend="triton"``: the local packed call and the stretch run the Triton kernels (under
    the interpreter) and match the one-process float64 packed op."""
    res = run_ranks(cases.run_packed_on_kernels, 2, 6, start="spawn")
    bad = {}
    for r in res:
        assert len(r) == 4
        for cid, errs in r.items():
            need = {"o", "S", "dq", "dk", "dv", "dinit"} | ({"dg"} if "-none-" not in cid else set())
            assert need <= set(errs), cid
            wide = errs.pop("wide_passes")
            if cid.endswith("-whole"):  # no boundary inside a shard: the exchange in the op
                assert wide == 0, f"{cid}: {wide} passes of parallel/pairs.py"
            bad.update({f"{cid}:{n}": e for n, e in errs.items() if not e <= TOL["f32"]})
    assert not bad, f"relative errors above tolerance: {bad}"
