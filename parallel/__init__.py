"""lsp.parallel: sequence, tensor and expert parallelism for lsp (DESIGN.md §1, §4).

``sequence_parallel(op, *shard, group, method)`` runs an lsp op over a sequence split into
contiguous shards across a process group; ``exchange`` holds the three state-exchange methods
(``allgather``, ``allscan``, ``ring``) and their costs; ``pairs`` the per-family affine pairs.
"""

from lsp.parallel.exchange import METHODS, default_num_blocks
from lsp.parallel.sequence import sequence_parallel

__all__ = ["sequence_parallel", "METHODS", "default_num_blocks"]
