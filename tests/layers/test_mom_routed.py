"""Routed Mixture-of-Memories (each memory over the tokens routed to it, gathered in order)
equals the dense masked form to 1e-6 in float64, outputs and every gradient, in one process and
under CP=2 (ranks then hold different numbers of tokens per memory) and TP=2; with packed
documents too (the dense form then runs one op call per document, the routed one restarts each
memory at every document start)."""

from __future__ import annotations

import pytest
import torch

from lsp.testing import run_ranks

T, B, D, HEADS, DK = 24, 2, 16, 2, 4


# two rows of 24 tokens: boundaries inside the first CP=2 shard, at the rank edge and inside the
# second (a one-token document); in the second row a document spans both ranks
DOCS = [torch.tensor([0, 5, 12, 13, 24]), torch.tensor([0, 7, 24])]


def _run(topo, routed, checkpointing, docs=None):
    from lsp.layers import MixtureOfMemories, ParallelContext, init_parameters

    ctx = ParallelContext(topo, backend="torch", params_dtype=torch.float64)
    mom = MixtureOfMemories(D, HEADS, DK, num_memories=4, topk=2, expand_v=2.0, ctx=ctx,
                            routed=routed, memory_checkpointing=checkpointing)
    init_parameters(mom, seed=1, tp=ctx.tp_size, tp_rank=ctx.tp_rank)
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(T, B, D, generator=gen, dtype=torch.float64)
    dy_all = torch.randn(T, B, D, generator=gen, dtype=torch.float64)
    # this rank's tokens: contiguous CP shard, then its TP part (sequence parallel)
    parts = ctx.cp_size * ctx.tp_size
    r = ctx.cp_rank * ctx.tp_size + ctx.tp_rank
    sl = slice(r * T // parts, (r + 1) * T // parts)
    x = x_all[sl].clone().requires_grad_()
    y, aux = mom(x, cu_seqlens=docs)
    ((y * dy_all[sl]).sum() + aux).backward()
    return y.detach(), x.grad, {n: p.grad for n, p in mom.named_parameters()}


def _rank(rank, world, tp, cp, checkpointing, docs=None):
    from lsp.parallel.topology import init_topology

    topo = init_topology(tp, cp, 1)
    dense = _run(topo, False, checkpointing, docs)
    routed = _run(topo, True, checkpointing, docs)
    errs = {"y": (routed[0] - dense[0]).abs().max().item(),
            "dx": (routed[1] - dense[1]).abs().max().item()}
    for n in dense[2]:
        errs[n] = (routed[2][n] - dense[2][n]).abs().max().item()
    scale = max(dense[0].abs().max().item(), dense[1].abs().max().item())
    if docs is not None:  # the documents change the result (the comparison is not vacuous)
        across = _run(topo, True, checkpointing)[0]
        errs["across documents"] = -(across - routed[0]).abs().max().item()
    return errs, scale


@pytest.mark.parametrize("tp,cp,checkpointing", [(1, 1, False), (1, 2, False), (1, 2, True),
                                                 (2, 1, False)],
                         ids=["one", "cp2", "cp2-checkpointed", "tp2"])
def test_routed_mom_equals_dense_mom(tp, cp, checkpointing):
    for errs, scale in run_ranks(_rank, tp * cp, tp, cp, checkpointing):
        assert scale > 1e-3  # the comparison is not between zeros
        bad = {n: e for n, e in errs.items() if not e <= 1e-6}
        assert not bad, bad


def _unequal_rank(rank, world, heads):
    from lsp import ops
    from lsp.parallel import sequence_parallel
    from lsp.parallel.topology import init_topology

    topo = init_topology(1, 2, 1)
    g = torch.Generator().manual_seed(rank)
    Tl, Hh = 5 + 2 * rank, heads[rank]  # unequal local lengths
    q, k = (torch.nn.functional.normalize(torch.randn(1, Tl, Hh, 4, generator=g,
                                                      dtype=torch.float64), dim=-1)
            for _ in range(2))
    v = torch.randn(1, Tl, Hh, 4, generator=g, dtype=torch.float64)
    beta = torch.rand(1, Tl, Hh, generator=g, dtype=torch.float64)
    try:
        sequence_parallel(ops.delta_rule, q, k, v, beta, group=topo.cp_group,
                          equal_lengths=False, backend="torch")
        return "ran"
    except ValueError as e:
        return str(e)


def test_unequal_lengths_keep_the_other_consistency_checks():
    # equal_lengths=False drops only the length from the ranks' cross-check: unequal lengths
    # run, a head count that differs between the ranks is still refused on every rank
    assert run_ranks(_unequal_rank, 2, [2, 2]) == ["ran", "ran"]
    for msg in run_ranks(_unequal_rank, 2, [2, 3]):
        assert "disagree on H=[2, 3]" in msg, msg


@pytest.mark.parametrize("tp,cp,checkpointing", [(1, 1, False), (1, 2, False), (1, 2, True)],
                         ids=["one", "cp2", "cp2-checkpointed"])
def test_routed_mom_equals_dense_mom_on_packed_documents(tp, cp, checkpointing):
    for errs, scale in run_ranks(_rank, tp * cp, tp, cp, checkpointing, DOCS):
        assert scale > 1e-3
        assert errs.pop("across documents") < -1e-3, "the offsets made no difference"
        bad = {n: e for n, e in errs.items() if not e <= 1e-6}
        assert not bad, bad
