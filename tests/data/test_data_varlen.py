"""Packed documents in the data path: each sample's document offsets (``cu_seqlens``) from the
stdlib corpus (one source file a document) and from Megatron ``.bin/.idx`` indexes, per row of
a micro-batch, the same global offsets on every CP rank; the config turns it on by default."""

from __future__ import annotations

import numpy as np
import torch

from lsp.data import StdlibCorpus, WindowSampler
from lsp.data.corpus import DOC_SEPARATOR
from lsp.data.indexed import MegatronIndexedStream
from lsp.data.loader import StreamSamples
from lsp.train.config import DataConfig


def _expected_offsets(doc_starts, start, n):
    """Independent of the sampler: scan for document starts inside [start, start + n)."""
    return [0] + [int(d) - start for d in doc_starts if start < d < start + n] + [n]


def _check_sampler(stream, seq_len, micro_batch=3):
    samples = StreamSamples(stream, seq_len, seed=1, documents=True)
    sampler = WindowSampler(samples, micro_batch, 0, 1)
    full = sampler.micro_batch_at(2, 0)
    assert len(full.cu_seqlens) == micro_batch
    crossing = 0
    for b, cu in enumerate(full.cu_seqlens):
        start = samples._window(2 * micro_batch + b) * seq_len
        assert cu.dtype == torch.int32
        assert cu.tolist() == _expected_offsets(stream.doc_starts, start, seq_len)
        assert torch.equal(full.input_ids[b], torch.from_numpy(stream.window(start, seq_len)))
        crossing += len(cu) > 2
    # every CP rank gets its slice of the tokens and the same global offsets
    parts = [sampler.micro_batch_at(2, 0, cp_rank=r, cp_size=2) for r in range(2)]
    for p in parts:
        assert all(torch.equal(a, b) for a, b in zip(p.cu_seqlens, full.cu_seqlens))
    assert torch.equal(torch.cat([p.input_ids for p in parts], 1), full.input_ids)
    # without documents there are no offsets
    plain = WindowSampler(StreamSamples(stream, seq_len, seed=1), micro_batch, 0, 1)
    assert plain.micro_batch_at(2, 0).cu_seqlens is None
    return crossing


def test_stdlib_documents_are_source_files_with_an_end_token(tmp_path):
    texts = [b"x = 1\n", b"def f():\n    return 2\n" * 3, b"y", b"import os\n" * 9] + [
        b"a = %d\n" % i * (i % 3 + 1) for i in range(10)]
    for i, t in enumerate(texts):
        (tmp_path / f"m{i}.py").write_bytes(t)
    corpus = StdlibCorpus("train", valid_percent=0.0, root=str(tmp_path))
    assert len(corpus.doc_starts) == len(texts)
    for s in corpus.doc_starts[1:]:  # every document ends with the end-of-document bytes
        assert bytes(corpus.tokens[s - len(DOC_SEPARATOR):s]) == DOC_SEPARATOR
    assert _check_sampler(corpus, seq_len=24, micro_batch=2) >= 1


def test_stdlib_corpus_offsets_cross_documents():
    corpus = StdlibCorpus("train", max_bytes=600_000)
    assert _check_sampler(corpus, seq_len=32768) >= 1


def test_megatron_documents_from_the_index(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=n).astype(np.int32) for n in (5, 17, 1, 40, 9, 3, 22)]
    prefix = str(tmp_path / "toy")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(prefix + ".idx")
    stream = MegatronIndexedStream(prefix, vocab_size=1000)
    assert stream.doc_starts.tolist() == np.cumsum([0] + [len(d) for d in docs[:-1]]).tolist()
    assert _check_sampler(stream, seq_len=16, micro_batch=2) >= 1


def test_reset_at_document_boundaries_is_on_by_default():
    assert DataConfig().reset_state_at_document_boundaries is True
