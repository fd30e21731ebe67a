"""Data: the embedded corpus, Megatron indexed datasets via megatron-core, sampling, MQAR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lsp.data import StdlibCorpus, WindowSampler, rank_slice
from lsp.data.indexed import MegatronIndexedStream
from lsp.data.loader import IGNORE_INDEX, Batch, StreamSamples
from lsp.data.mqar import MQAR, accuracy


@pytest.fixture(scope="module")
def corpus():
    return StdlibCorpus("train", max_bytes=3_000_000)


def test_stdlib_corpus_is_bytes_and_split_is_disjoint(corpus):
    valid = StdlibCorpus("valid")
    assert corpus.tokens.dtype == np.uint8 and len(corpus) >= 3_000_000
    assert corpus.vocab_size == 256 and len(valid) > 10_000
    # the same call twice gives the same stream (deterministic file order and split)
    again = StdlibCorpus("train", max_bytes=3_000_000)
    assert np.array_equal(again.tokens, corpus.tokens)
    # no document is in both splits: compare the first 200 bytes of each document
    heads = lambda c: {bytes(c.tokens[s:s + 200]) for s in c.doc_starts}
    assert not (heads(corpus) & heads(valid))


def test_window_sampler_is_deterministic_disjoint_across_dp_and_resumable(corpus):
    samples = StreamSamples(corpus, seq_len=128, seed=3)
    s0 = WindowSampler(samples, micro_batch=2, dp_rank=0, dp_size=2, accum=2)
    s1 = WindowSampler(samples, micro_batch=2, dp_rank=1, dp_size=2, accum=2)
    b0, b1 = s0.micro_batch_at(5, 1), s1.micro_batch_at(5, 1)
    assert b0.input_ids.shape == (2, 128) and not torch.equal(b0.input_ids, b1.input_ids)
    # labels are the inputs shifted by one token
    assert torch.equal(b0.input_ids[:, 1:], b0.labels[:, :-1])
    # a fresh sampler (a resumed run) yields the same batch for the same step
    again = WindowSampler(StreamSamples(corpus, seq_len=128, seed=3), 2, 0, 2, 2)
    assert torch.equal(again.micro_batch_at(5, 1).input_ids, b0.input_ids)


def test_cp_slices_are_contiguous_and_cover_the_sequence(corpus):
    samples = StreamSamples(corpus, seq_len=96, seed=0)
    full = WindowSampler(samples, 1, 0, 1).micro_batch_at(0, 0)
    parts = [WindowSampler(samples, 1, 0, 1).micro_batch_at(0, 0, cp_rank=r, cp_size=3)
             for r in range(3)]
    assert torch.equal(torch.cat([p.input_ids for p in parts], 1), full.input_ids)
    assert torch.equal(torch.cat([p.labels for p in parts], 1), full.labels)
    with pytest.raises(ValueError, match="sequence length 96 is not divisible by cp=5"):
        rank_slice(full, 0, 5)


def test_megatron_indexed_dataset_through_megatron_reader(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=n).astype(np.int32) for n in (5, 17, 1, 40, 9)]
    prefix = str(tmp_path / "toy")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(prefix + ".idx")
    stream = MegatronIndexedStream(prefix, vocab_size=1000)
    flat = np.concatenate(docs)
    assert len(stream) == len(flat)
    for start, length in ((0, 5), (3, 20), (21, 30), (0, len(flat))):
        assert np.array_equal(stream.window(start, length), flat[start:start + length])
    with pytest.raises(ValueError, match="not found; pass the common prefix"):
        MegatronIndexedStream(str(tmp_path / "missing"), 1000)


def test_mqar_keys_early_queries_late_and_accuracy():
    task = MQAR(seq_len=64, num_pairs=4, vocab_size=32, seed=1)
    x, y = task(7)
    keys, vals = x[0:8:2], x[1:8:2]
    q = np.nonzero(y != IGNORE_INDEX)[0]
    assert len(q) == 4 and q.min() >= 64 - 8  # queries sit in the last 2N positions
    for pos in q:
        i = list(keys).index(x[pos])
        assert y[pos] == vals[i] and x[pos + 1] == vals[i]
    # under CP=2 the keys are on rank 0 and every query on rank 1
    b = rank_slice(Batch(torch.from_numpy(x)[None], torch.from_numpy(y)[None]), 1, 2)
    assert (b.labels != IGNORE_INDEX).sum() == 4
    logits = torch.full((1, 64, 32), -1.0)
    logits[0, torch.from_numpy(q), torch.from_numpy(y[q])] = 1.0
    assert accuracy(logits, torch.from_numpy(y)[None]) == (4, 4)
    with pytest.raises(ValueError, match="num_pairs=40 exceeds"):
        MQAR(seq_len=256, num_pairs=40, vocab_size=32)
