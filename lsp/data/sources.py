"""The sample source for a run's ``data`` config: ``j -> (input_ids, labels)``."""

from __future__ import annotations

from lsp.data.loader import StreamSamples


def build_samples(data, seq_len: int, seed: int, split: str = "train"):
    """Samples of ``seq_len`` tokens for a validated ``lsp.train.config.DataConfig``."""
    if data.kind == "stdlib":
        from lsp.data.corpus import StdlibCorpus

        stream = StdlibCorpus(split, valid_percent=data.valid_percent, root=data.root,
                              max_bytes=data.max_bytes)
        return StreamSamples(stream, seq_len, seed, data.reset_state_at_document_boundaries)
    if data.kind == "megatron":
        from lsp.data.indexed import MegatronIndexedStream

        prefix = data.path if split == "train" else data.valid_path or data.path
        return StreamSamples(MegatronIndexedStream(prefix, data.vocab_size), seq_len,
                             seed + (0 if split == "train" else 1),
                             data.reset_state_at_document_boundaries)
    from lsp.data.mqar import MQAR  # DataConfig admits stdlib, megatron and mqar only

    task = MQAR(seq_len, data.num_pairs, data.vocab_size,
                seed=seed + (0 if split == "train" else 10_000_019))
    task.vocab_size = data.vocab_size
    return task
