"""Multi-document MQAR: a model trained on packed documents must not see earlier documents.

A sequence packs 3 documents. Each document writes 3 key-value pairs, then asks 4 queries: two
of its own keys (label: the value) and two keys that the PREVIOUS document wrote but this one
did not (label: NONE, "not in this document"). Consecutive documents use disjoint keys. With
the state reset at every boundary the task is exact; if any state leaked across a boundary, the
previous document's keys would be found and the NONE answers would fail. A small DeltaNet model
trained with ``cu_seqlens`` must reach 90% accuracy; evaluated without the offsets (the state
then flows across documents) its accuracy on the previous document's keys collapses, which shows
that the task measures the reset.
"""

from __future__ import annotations

import numpy as np
import torch

from lsp.layers import ParallelContext
from lsp.model import DecoderLM, ModelConfig

NK, NV, NONE, PAIRS, L, DOCS = 8, 16, 0, 3, 24, 3  # keys 1..8, values 9..24, NONE = 0 (filler)
IGNORE = -100


def _sample(rng):
    T = L * DOCS
    x = np.zeros(T, np.int64)
    y = np.full(T, IGNORE, np.int64)
    prev_doc = np.zeros(T, bool)  # queries of the previous document's keys
    prev = []
    for d in range(DOCS):
        o = d * L
        keys = rng.choice([k for k in range(1, NK + 1) if k not in prev], PAIRS, replace=False)
        vals = 1 + NK + rng.integers(0, NV, PAIRS)
        x[o:o + 2 * PAIRS:2], x[o + 1:o + 2 * PAIRS:2] = keys, vals
        absent = prev or [k for k in range(1, NK + 1) if k not in keys.tolist()]
        qa = [(keys[i], vals[i], False) for i in rng.choice(PAIRS, 2, replace=False)]
        qa += [(k, NONE, bool(prev)) for k in rng.choice(absent, 2, replace=False)]
        for i in rng.permutation(len(qa)):
            k, a, p = qa[i]
            t = o + L - 8 + 2 * len(np.flatnonzero(y[o:o + L] != IGNORE))
            x[t], x[t + 1], y[t], prev_doc[t] = k, a, a, p
        prev = keys.tolist()
    return x, y, prev_doc


def _batch(B, seed):
    rng = np.random.default_rng(seed)
    xs, ys, ps = zip(*[_sample(rng) for _ in range(B)])
    return torch.tensor(np.stack(xs)), torch.tensor(np.stack(ys)), torch.tensor(np.stack(ps))


def test_mqar_with_several_documents_needs_the_reset():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is several times faster on a busy CPU
    try:
        _train_and_check()
    finally:
        torch.set_num_threads(threads)


def _train_and_check():
    torch.manual_seed(0)
    B = 8
    cu = [torch.arange(0, L * DOCS + 1, L, dtype=torch.int32) for _ in range(B)]
    cfg = ModelConfig(vocab_size=1 + NK + NV, hidden_size=48, num_heads=2, head_dim=24,
                      ffn_hidden_size=96, pattern="DD", ffn_pattern="FF", num_experts=0,
                      init_std=0.02)
    model = DecoderLM(cfg, ParallelContext(backend="torch"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(300):
        x, y, _ = _batch(B, step)
        out = model(x, y, loss_mask=(y != IGNORE).float(), cu_seqlens=cu)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    x, y, prev_doc = _batch(16, 10**6)
    cu = [cu[0]] * 16
    model.eval()
    with torch.no_grad():
        reset = model(x, cu_seqlens=cu).logits.transpose(0, 1).argmax(-1)
        leak = model(x).logits.transpose(0, 1).argmax(-1)
    asked = y != IGNORE
    acc = float(((reset == y) & asked).sum() / asked.sum())
    acc_prev = float(((reset == y) & prev_doc).sum() / prev_doc.sum())
    leak_prev = float(((leak == y) & prev_doc).sum() / prev_doc.sum())
    assert acc >= 0.9 and acc_prev >= 0.9, (acc, acc_prev)
    assert leak_prev <= 0.6, leak_prev  # without the reset the earlier document answers
