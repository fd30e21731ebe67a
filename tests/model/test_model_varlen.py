"""The decoder on packed documents: every layer resets at each boundary.

One process: the packed model's logits equal the model run on each document alone (the unpacked
path, an independent reference), for every mixer (L, D, G, M, S) with short convolutions, for
one row and for a batch of rows with their own offsets. Under CP (gloo, 2 and 4 ranks, every
exchange method) the shards' logits equal the one-process packed run, with a MoE FFN too.
"""

from __future__ import annotations

import pytest
import torch
from lsp.testing import run_ranks

from lsp.layers import ParallelContext
from lsp.model import DecoderLM, ModelConfig

SMALL = dict(vocab_size=64, hidden_size=32, num_heads=4, head_dim=8, ffn_hidden_size=64,
             use_short_conv=True, init_std=0.1)
OFFSETS = [0, 1, 9, 10, 30, 37]


def _ids(B, T, seed=0):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def _per_document(model, ids_row, offsets):
    return torch.cat([model(ids_row[:, a:b]).logits for a, b in zip(offsets[:-1], offsets[1:])])


@torch.no_grad()
def test_packed_model_equals_each_document_alone():
    model = DecoderLM(ModelConfig(**SMALL, pattern="LDGMS", ffn_pattern="FFF-F"),
                      ParallelContext(backend="torch"))
    ids = _ids(1, OFFSETS[-1])
    packed = model(ids, cu_seqlens=torch.tensor(OFFSETS, dtype=torch.int32)).logits
    ref = _per_document(model, ids, OFFSETS)
    assert (packed - ref).abs().max() < 1e-5 * ref.abs().max()
    assert (model(ids).logits - ref).abs().max() > 1e-2  # unpacked leaks: the guard
    rows = [torch.tensor([0, 5, 20]), torch.tensor([0, 1, 2, 20])]
    ids2 = _ids(2, 20, seed=1)
    packed2 = model(ids2, cu_seqlens=rows).logits
    for b, r in enumerate(rows):
        ref = _per_document(model, ids2[b:b + 1], r.tolist())
        assert (packed2[:, b] - ref[:, 0]).abs().max() < 1e-5 * ref.abs().max()


def test_packed_model_rejects_offsets_for_the_wrong_batch():
    model = DecoderLM(ModelConfig(**SMALL, pattern="G"), ParallelContext(backend="torch"))
    with pytest.raises(ValueError,
                       match="cu_seqlens gives offsets for 1 rows but the micro-batch has B=2"):
        model(_ids(2, 8), cu_seqlens=torch.tensor([0, 3, 8]))


def _cp_rank(rank, P, pattern, ffn, methods):
    from lsp.parallel.topology import init_topology

    topo = init_topology(cp=P)
    T = 8 * P
    offsets = [0, 3, 8, 9, T - 5, T]  # a boundary on the first rank edge, one inside a shard
    ids = _ids(1, T, seed=2)
    cfg = dict(SMALL, pattern=pattern, ffn_pattern=ffn)
    cu = torch.tensor(offsets)
    ref = DecoderLM(ModelConfig(**cfg), ParallelContext(backend="torch"))
    out = {}
    for method in methods:
        balance = method == "allgather"  # softmax attention's balanced layout with one method
        model = DecoderLM(ModelConfig(**cfg), ParallelContext(topo=topo, sp_method=method,
                                                              backend="torch",
                                                              attention_load_balance=balance))
        sl = slice(rank * 8, (rank + 1) * 8)
        logits = model(ids[:, sl], cu_seqlens=cu).logits
        labels = _ids(1, T, seed=3)[:, sl]
        model(ids[:, sl], labels, cu_seqlens=cu).loss.backward()  # every rank's backward runs
        finite = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                     for p in model.parameters())
        with torch.no_grad():
            want = ref(ids, cu_seqlens=cu).logits[sl]
        out[method] = (logits.detach(), want, finite)
    return out


@pytest.mark.parametrize("P", [2, 4])
def test_packed_model_under_cp_equals_one_process(P):
    for res in run_ranks(_cp_rank, P, "LDGMS", "FFF-F", ("allgather", "allscan", "ring")):
        for method, (logits, want, finite) in res.items():
            assert finite, method
            assert (logits - want).abs().max() < 1e-5 * want.abs().max(), method
