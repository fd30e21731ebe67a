"""Document-causal softmax attention on packed documents: a query sees only earlier keys of its
own document, in one process and under CP (gloo), gathered or with the balanced layout.
Reference: torch's causal ``scaled_dot_product_attention`` on each document alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lsp.testing import run_ranks

from lsp.layers.doc_attention import document_causal_attention

H, HKV, D = 4, 2, 8


def _inputs(T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(1, T, HKV, D, generator=gen, dtype=torch.float64)
    v = torch.randn(1, T, HKV, D, generator=gen, dtype=torch.float64)
    do = torch.randn(1, T, H, D, generator=gen, dtype=torch.float64)
    return q, k, v, do


def _reference(q, k, v, offsets):
    outs = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        qd, kd, vd = (t[:, a:b].transpose(1, 2) for t in (q, k, v))
        kd, vd = kd.repeat_interleave(H // HKV, 1), vd.repeat_interleave(H // HKV, 1)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(1, 2))
    return torch.cat(outs, dim=1)


def _grads(fn, q, k, v, do):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves)
    return (o.detach(),) + torch.autograd.grad((o * do).sum(), leaves)


def test_document_causal_attention_one_process():
    offsets = [0, 1, 6, 7, 20, 23]
    q, k, v, do = _inputs(offsets[-1])
    cu = torch.tensor(offsets, dtype=torch.int32)
    got = _grads(lambda *a: document_causal_attention(*a, cu), q, k, v, do)
    want = _grads(lambda *a: _reference(*a, offsets), q, k, v, do)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-12)
    # plain causal attention over the packed sequence differs (the guard)
    whole = _reference(q, k, v, [0, offsets[-1]])
    assert not torch.allclose(whole, want[0], atol=1e-3)


def _cp_rank(rank, P, offsets, balance):
    import torch.distributed as dist

    T = offsets[-1]
    Tl = T // P
    q, k, v, do = _inputs(T, seed=1)
    sl = slice(rank * Tl, (rank + 1) * Tl)
    got = _grads(lambda *a: document_causal_attention(*a, torch.tensor(offsets),
                                                      dist.group.WORLD, balance),
                 q[:, sl], k[:, sl], v[:, sl], do[:, sl])
    want = _grads(lambda *a: _reference(*a, offsets), q, k, v, do)
    return [float((g - w[:, sl]).abs().max()) for g, w in zip(got, want)]


@pytest.mark.parametrize("P", [2, 3, 4])
def test_document_causal_attention_under_cp(P):
    # a document across every rank edge but one, a one-token document, boundaries inside shards
    T = 6 * P
    offsets = sorted({0, 1, 4, 6, 7, T - 3, T})
    for balance in (False, True):
        for errs in run_ranks(_cp_rank, P, offsets, balance):
            assert max(errs) < 1e-12, (balance, errs)


def _rows_rank(rank, P, rows, balance=False):
    import torch.distributed as dist

    T = rows[0][-1]
    Tl = T // P
    q, k, v, do = (torch.cat(x) for x in zip(_inputs(T, seed=2), _inputs(T, seed=3)))
    sl = slice(rank * Tl, (rank + 1) * Tl)
    group = dist.group.WORLD if P > 1 else None
    got = _grads(lambda *a: document_causal_attention(*a, [torch.tensor(r) for r in rows],
                                                      group, balance),
                 q[:, sl], k[:, sl], v[:, sl], do[:, sl])
    wants = [_grads(lambda *a: _reference(*a, r), *(t[b:b + 1] for t in (q, k, v, do)))
             for b, r in enumerate(rows)]
    want = [torch.cat(w) for w in zip(*wants)]
    return [float((g - w[:, sl]).abs().max()) for g, w in zip(got, want)]


@pytest.mark.parametrize("P,balance", [(1, False), (2, False), (2, True)])
def test_per_document_kernels_on_rows_of_their_own_documents(P, balance):
    """Two rows with their own offsets: documents of 1 to 14 tokens grouped by padded length
    (13 and 14 in one padded batch, single tokens padded to two),
    one across the rank edge in each row (lower-right causal), in one process and under CP=2,
    gathered or balanced (each block cut along the documents)."""
    rows = [[0, 1, 6, 7, 20, 23, 24], [0, 14, 15, 24]]
    for errs in run_ranks(_rows_rank, P, rows, balance):
        assert max(errs) < 1e-12, errs


def test_explicit_fused_backend_is_not_replaced_on_the_cpu():
    q, k, v, _ = _inputs(8)
    with pytest.raises(ValueError, match="attention_backend='flash' cannot run this attention"):
        document_causal_attention(q, k, v, torch.tensor([0, 3, 8]), backend="flash")


def _cudnn_rank(rank, P):
    import torch.distributed as dist

    q, k, v, _ = _inputs(12)
    try:
        document_causal_attention(q[:, :6], k[:, :6], v[:, :6], torch.tensor([0, 4, 12]),
                                  dist.group.WORLD, False, "cudnn")
    except ValueError as e:
        return str(e)
    return "ran"


def test_cudnn_gathered_cp_is_refused_on_every_rank():
    # a document continuing from an earlier rank needs a lower-right causal block; the refusal
    # comes on every rank before the gather, so no rank is left waiting in a collective
    for msg in run_ranks(_cudnn_rank, 2):
        assert "needs the balanced layout" in msg, msg


def test_index_tables_are_built_once_per_offsets(monkeypatch):
    """Two layer calls with one offsets tensor build the host index tables once."""
    from lsp.layers import doc_attention

    calls = []
    orig = doc_attention._document_tables
    monkeypatch.setattr(doc_attention, "_document_tables",
                        lambda *a: calls.append(1) or orig(*a))
    q, k, v, _ = _inputs(23)
    cu = torch.tensor([0, 1, 6, 7, 20, 23])
    first = document_causal_attention(q, k, v, cu)
    again = document_causal_attention(q * 2, k, v, cu)
    assert len(calls) == 1
    assert not torch.allclose(first, again)  # the same tables, new values


def test_square_groups_pad_little_and_place_each_row_once():
    """The batching of square document parts: each part's rows once (so no gradient is added
    twice into a row), padded by less than a quarter of its length, never to a single key
    (cuDNN refuses one), and a lone unpadded part is a slice (no copy)."""
    from lsp.parallel.cp_doc_attention import square_groups

    lengths = [1, 1, 5, 6, 13, 14, 100, 24576, 3000]
    parts, row = [], 0
    for n in lengths:
        parts.append((row, 7 + row, n))
        row += n
    seen = []
    for qi, ki, slots, m, L, q0, k0 in square_groups(parts):
        assert L >= 2 and len(qi) == len(ki)
        assert torch.equal(ki - qi, torch.full_like(qi, 7))
        if slots is None:
            assert len(qi) == m * L
        else:
            assert slots.unique().numel() == len(slots) == len(qi) and int(slots.max()) < m * L
        mine = [p for p in parts if p[0] in set(qi.tolist())]
        assert len(mine) == m and all(n <= L < 1.25 * n + 2 for _, _, n in mine)
        assert (q0 is not None) == (m == 1 and slots is None)
        seen += qi.tolist()
    assert sorted(seen) == list(range(row))
    assert [g[4] for g in square_groups([(0, 0, 24576)])] == [24576]  # not rounded to 32K
