"""Run under ``mpiexec -n P``: MPI's Exscan of the affine pairs vs the torch.distributed exchange.

Each rank computes its pair (A_r, B_r) and effective queries from its shard, then
- S_start and S_final from mpi4py's Exscan/Allreduce with a non-commutative user operator
  (lsp.parallel.mpi_check), and
- S_start and S_final from every torch.distributed exchange method (gloo, rendezvous through MPI),
and the outputs of sequence_parallel against o0 + qe @ S_start(MPI). Prints one JSON line per
rank with the largest relative error and exits non-zero above 1e-12.
"""

import json
import sys

import torch
import torch.distributed as dist
from mpi4py import MPI

import lsp
from lsp.parallel import METHODS, pairs, sequence_parallel
from lsp.parallel.exchange import make_exchange
from lsp.parallel.mpi_check import mpi_exscan_states
from lsp.testing import FAMILIES, GATES, make_inputs, op_args, rel_err

comm = MPI.COMM_WORLD
rank, P = comm.Get_rank(), comm.Get_size()
port = None
if rank == 0:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
port = comm.bcast(port, root=0)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P)

OPS = {"linear_attention": lsp.ops.linear_attention, "delta_rule": lsp.ops.delta_rule}
B, Tl, H, K, V = 2, 23, 2, 6, 5
worst = {}
for family in FAMILIES:
    for gate in GATES:
        full = make_inputs(family, gate, B, P * Tl, H, K, V, seed=5)
        sl = slice(rank * Tl, (rank + 1) * Tl)
        sh = {n: t.detach()[:, sl] for n, t in full.items() if n != "initial_state"}
        init = full["initial_state"].detach()
        op = OPS[family]
        local = pairs.local_pass(op.spec, op.spec.bind(*op_args(sh), backend="torch"))
        A, Bst = local.pair()
        o0, qe = local.outputs()
        S_start_mpi, S_final_mpi = mpi_exscan_states(local.kind, A, Bst, init)
        errs = []
        for method in METHODS:
            ex = make_exchange(method, local.kind, None, True, 2, Bst.numel() * 8, V)
            S_start, S_final = ex.forward(A, Bst.contiguous(), init)
            errs += [rel_err(S_start, S_start_mpi), rel_err(S_final, S_final_mpi)]
            o, S = sequence_parallel(op, *op_args(sh), method=method, initial_state=init,
                                     output_final_state=True, backend="torch")
            o_mpi = o0 + torch.einsum("bthk,bhkv->bthv", qe, S_start_mpi)
            errs += [rel_err(o, o_mpi), rel_err(S, S_final_mpi)]
        worst[f"{family}-{gate}"] = max(errs)

print(json.dumps({"rank": rank, "P": P, "max_rel_err": worst}), flush=True)
dist.destroy_process_group()
sys.exit(0 if max(worst.values()) <= 1e-12 else 1)
