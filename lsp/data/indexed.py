"""Megatron ``.bin/.idx`` indexed datasets, read through megatron-core's ``IndexedDataset``.

For users who preprocessed data with Megatron's tools (``tools/preprocess_data.py``): the
documents are treated as one stream in index order (as Megatron's GPT dataset packs them) and
windows are read with ``IndexedDataset.get(document, offset, length)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class MegatronIndexedStream:
    """A ``.bin/.idx`` pair as one token stream with document start offsets."""

    def __init__(self, path_prefix: str, vocab_size: int):
        prefix = str(path_prefix)
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).is_file():
                raise ValueError(
                    f"data.path={prefix!r}: {prefix + ext} not found; pass the common prefix of "
                    "a Megatron .bin/.idx pair (without the extension)"
                )
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.ds = IndexedDataset(prefix, mmap=True)
        lengths = np.asarray(self.ds.index.sequence_lengths, dtype=np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.lengths = lengths
        self.total = int(lengths.sum())
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.total

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream, across document ends, as int64."""
        out, pos, need = [], start, length
        doc = int(np.searchsorted(self.doc_starts, start, side="right") - 1)
        while need > 0:
            if doc >= len(self.lengths):
                raise ValueError(f"window [{start}, {start + length}) runs past the data ({self.total} tokens)")
            off = pos - int(self.doc_starts[doc])
            take = min(need, int(self.lengths[doc]) - off)
            if take > 0:
                out.append(np.asarray(self.ds.get(doc, offset=off, length=take), dtype=np.int64))
                pos += take
                need -= take
            doc += 1
        return np.concatenate(out)
