"""The decoder under every parallel layout equals the one-process run (issue 5's main test).

For each mixer kind (one-layer models L, D, G, M, S) and a hybrid with MoE (G, M, S mixers;
MoE / dense / MoE FFNs, shared expert, tied head), under TP2, CP2, EP2, TP2xCP2, CP2xEP2 and CP3
on gloo ranks (fp32): the global loss (LM + auxiliary) and every parameter gradient,
shard by shard, match the one-process run within 1e-5 (relative), for each SP exchange method
(``allgather``, ``allscan``, ``ring``) whenever CP > 1 (at CP = 1 no exchange happens and the
method is unused). The initial weights are compared too: bit-identical shards of the
one-process weights.
"""

from __future__ import annotations

import pytest

from lsp.testing import equivalence as E
from lsp.testing import run_ranks


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "ref.pt"
    assert run_ranks(E.reference_rank, 1, str(path)) == [sorted(E.CASES)]
    return str(path)


@pytest.mark.parametrize("layout", list(E.LAYOUTS))
def test_layout_equals_one_process(layout, reference):
    world, tp, cp, ep = E.LAYOUTS[layout]
    rows = [row for rank_rows in run_ranks(E.layout_rank, world, tp, cp, ep, reference)
            for row in rank_rows]
    methods = {m for _, m, _, _ in rows}
    assert methods == (set(E.METHODS) if cp > 1 else {"allscan"})
    assert {c for c, _, _, _ in rows} == set(E.CASES)
    params = [r for r in rows if r[2].startswith("param:")]
    assert params and all(err == 0.0 for *_, err in params), \
        [r for r in params if r[3] != 0.0][:5]
    checked = [r for r in rows if not r[2].startswith("param:")]
    bad = [r for r in checked if not r[3] <= E.TOL]
    assert not bad, f"{len(bad)} of {len(checked)} checks above {E.TOL}: {bad[:8]}"
