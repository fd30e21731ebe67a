"""lsp.parallel: sequence, tensor and expert parallelism for lsp (docs/design.md: The affine
scan, Parallel layout).

- ``sequence_parallel(op, *shard, group, method)`` runs an lsp op over a sequence split into
  contiguous shards across a process group; ``exchange`` holds the three state-exchange methods
  (``allgather``, ``allscan``, ``ring``) and their costs; ``pairs`` the per-family affine pairs;
  ``mpi_check`` the MPI ``Exscan`` cross-check.
- ``init_topology(tp, cp, ep)`` builds the DP x CP x TP x EP grid on megatron-core's
  ``parallel_state`` (``topology``); ``megatron_shim`` lets megatron's modules run on gloo CPUs.
- ``reduce_gradients`` sums gradients over the ranks that share each parameter (``grads``);
  ``halo_exchange`` passes a short convolution's previous tokens across CP ranks (``halo``);
  ``all_gather_sequence`` gathers K/V over CP for softmax attention (``seq_gather``).
"""

from lsp.parallel.exchange import METHODS, default_num_blocks
from lsp.parallel.grads import reduce_gradients
from lsp.parallel.halo import halo_exchange
from lsp.parallel.seq_gather import all_gather_sequence
from lsp.parallel.sequence import sequence_parallel
from lsp.parallel.topology import Topology, check_layout, destroy_topology, init_topology

__all__ = [
    "sequence_parallel",
    "METHODS",
    "default_num_blocks",
    "Topology",
    "init_topology",
    "check_layout",
    "destroy_topology",
    "reduce_gradients",
    "halo_exchange",
    "all_gather_sequence",
]
