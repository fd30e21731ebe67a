"""Training data: token streams, the per-rank batch slicing, and the MQAR task.

- ``corpus.StdlibCorpus``: the embedded default, byte-level tokens of the Python standard
  library's source files (present on every machine with Python), split train/valid by file.
- ``indexed.MegatronIndexedStream``: Megatron ``.bin/.idx`` datasets through megatron-core's own
  ``IndexedDataset`` reader.
- ``mqar.MQAR``: synthetic multi-query associative recall at long context (keys early, queries
  late, so under CP keys sit on early ranks and queries on late ranks), with an accuracy metric.
- ``loader.WindowSampler`` / ``rank_slice``: deterministic windows per step and data-parallel
  rank, and each context-parallel rank's contiguous slice of them.
"""

from lsp.data.corpus import StdlibCorpus
from lsp.data.loader import Batch, WindowSampler, rank_slice

__all__ = ["StdlibCorpus", "WindowSampler", "Batch", "rank_slice"]
