"""Process topology: a DP x CP x TP x EP grid on megatron-core's ``parallel_state``
(docs/design.md, Parallel layout).

    topo = init_topology(tp=2, cp=2, ep=1)       # after torch.distributed.init_process_group
    topo.tp_group, topo.cp_group, topo.dp_group, topo.ep_group, ...   # pass these to modules
    topo.pg_collection                             # megatron's ProcessGroupCollection (MoE, DDP)

Layout (megatron's order ``tp-cp-ep-dp-pp``): TP ranks are adjacent, then CP, then DP; for the
expert part of the model the same ranks form an expert grid ETP x EP x EDP with ETP = 1 (experts
are never split inside; they are split *over* EP and replicated over the rest), so
``world = tp * cp * dp`` and ``ep`` divides ``world``. With TP > 1 the residual stream is
sequence-sharded over the TP group between blocks (megatron's "sequence parallel"), which is
what megatron's MoE layer expects under TP.

Groups work on gloo (CPU) and NCCL (GPU): megatron creates them with the default backend. For a
CPU run (no CUDA, or a gloo default group) :func:`init_topology` installs
``lsp.parallel.megatron_shim`` so that megatron's modules run on gloo. Layout errors (sizes that do not divide) raise ``ValueError`` from
:func:`check_layout` before any collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Topology", "check_layout", "init_topology", "destroy_topology"]


def check_layout(world_size: int, tp: int = 1, cp: int = 1, ep: int = 1) -> int:
    """Validate a layout and return the data-parallel size ``world_size // (tp * cp)``.

    Raises ``ValueError`` naming the value and the fix; touches no process group.
    """
    for name, value in (("tp", tp), ("cp", cp), ("ep", ep)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: parallel sizes must be integers >= 1")
    if world_size % (tp * cp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*cp = {tp}*{cp} = {tp * cp}; "
            f"choose tp and cp whose product divides the number of ranks"
        )
    if world_size % ep != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by ep={ep}; expert parallelism splits the "
            f"experts over ep ranks, so ep must divide the number of ranks"
        )
    return world_size // (tp * cp)


@dataclass
class Topology:
    """This rank's place in the DP x CP x TP x EP grid and the process groups of each axis.

    Every group is a ``torch.distributed`` process group (size 1 where the axis is 1). Ranks in
    ``cp_group`` hold consecutive contiguous slices of the sequence in group-rank order.
    """

    tp: int
    cp: int
    ep: int
    dp: int
    rank: int
    world_size: int
    tp_group: object
    cp_group: object
    dp_group: object
    ep_group: object
    dp_cp_group: object
    tp_cp_group: object
    expt_dp_group: object
    pg_collection: object = field(repr=False)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.cp_group)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group)

    @property
    def sequence_parallel(self) -> bool:
        """Whether the residual stream is sequence-sharded over the TP group (TP > 1)."""
        return self.tp > 1

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: dp {self.dp_rank}/{self.dp} cp {self.cp_rank}/"
            f"{self.cp} tp {self.tp_rank}/{self.tp} ep {self.ep_rank}/{self.ep}"
        )


def init_topology(
    tp: int = 1,
    cp: int = 1,
    ep: int = 1,
    *,
    timeout: timedelta | None = None,
) -> Topology:
    """Build the grid on megatron-core's ``parallel_state`` and return this rank's :class:`Topology`.

    ``torch.distributed`` must be initialised (any backend; gloo on CPU). Sizes are checked before
    any collective. Re-initialising destroys the previous megatron state first.
    """
    if not dist.is_initialized():
        raise ValueError(
            "init_topology needs torch.distributed to be initialised first: call "
            "torch.distributed.init_process_group(backend='gloo' or 'nccl', ...) before it"
        )
    world = dist.get_world_size()
    dp = check_layout(world, tp, cp, ep)

    from lsp.parallel import megatron_shim

    # CPU run (no CUDA, or gloo: CPU tensors): megatron's torch.cuda calls go through the shim;
    # on an NCCL run only the missing-TE fix-up is applied
    megatron_shim.install(force=dist.get_backend() == "gloo")

    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    kwargs = {}
    if timeout is not None:
        kwargs["distributed_timeout_minutes"] = max(1, int(timeout.total_seconds() // 60))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
        order="tp-cp-ep-dp-pp",
        create_gloo_process_groups=False,
        **kwargs,
    )
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    topo = Topology(
        tp=tp,
        cp=cp,
        ep=ep,
        dp=dp,
        rank=dist.get_rank(),
        world_size=world,
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        tp_cp_group=ps.get_tensor_and_context_parallel_group(),
        expt_dp_group=ps.get_expert_data_parallel_group(),
        pg_collection=pgc,
    )
    # Contiguous sequence shards follow cp-group rank order; megatron orders group ranks by
    # global rank, which is what the data sharding assumes. Check the group sizes match.
    assert topo.tp_group.size() == tp and topo.cp_group.size() == cp
    assert topo.ep_group.size() == ep and topo.dp_group.size() == dp
    return topo


def destroy_topology() -> None:
    """Tear down megatron's groups (the default process group stays)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
