"""GPU check of the layers and the hybrid decoder under a parallel layout (NCCL).

The CPU test suite runs the same comparison on gloo (``tests/model/test_model_layouts.py``); this
runs it on GPUs, with megatron's CUDA paths (no CPU shim) and the op backend of your choice:

    # 1. the one-process reference, on one GPU
    torchrun --nproc-per-node 1 -m lsp.launch.check_gpu --reference /tmp/ref.pt
    # 2. each layout against it (world size = tp * cp * dp; ep divides it)
    torchrun --nproc-per-node 2 -m lsp.launch.check_gpu --compare /tmp/ref.pt --tp 2
    torchrun --nproc-per-node 2 -m lsp.launch.check_gpu --compare /tmp/ref.pt --cp 2 --ep 2
    torchrun --nproc-per-node 4 -m lsp.launch.check_gpu --compare /tmp/ref.pt --tp 2 --cp 2

Every case of ``lsp.testing.equivalence.CASES`` (each mixer kind, a hybrid with MoE) runs in
float32 with TF32 off, for every SP method when CP > 1. Rank 0 prints the worst relative error
per case and method; the exit status is 1 when a loss or gradient is above ``--tol`` or an
initial weight differs from the reference shard. Use the same ``--backend`` for both steps to
test the layout alone, or a torch reference against ``--backend triton`` to test both.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--reference", metavar="PATH", help="write the one-process run here")
    mode.add_argument("--compare", metavar="PATH", help="compare this layout with a reference")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--backend", default="torch", choices=("torch", "triton", "auto"))
    ap.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    ap.add_argument("--tol", type=float, default=None, help="default: 1e-5 (torch), 1e-3 otherwise")
    args = ap.parse_args(argv)

    from lsp.parallel.topology import check_layout, init_topology
    from lsp.testing import equivalence as E

    cases = args.cases.split(",") if args.cases else list(E.CASES)
    unknown = sorted(set(cases) - set(E.CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {sorted(E.CASES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.reference and world != 1:
        raise SystemExit("--reference runs in one process: torchrun --nproc-per-node 1")
    check_layout(world, args.tp, args.cp, args.ep)  # before any collective
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the CPU path is checked by "
                         "pytest tests/model/test_model_layouts.py")

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    device = torch.device("cuda", local)
    try:
        if args.reference:
            topo = init_topology()
            ref = E.reference(topo, cases, args.backend, device)
            torch.save(ref, args.reference)
            print(f"reference of {len(ref)} cases written to {args.reference}")
            return 0
        topo = init_topology(args.tp, args.cp, args.ep)
        ref = torch.load(args.compare)
        tol = args.tol if args.tol is not None else (E.TOL if args.backend == "torch" else 1e-3)
        rows = E.layout_rows(topo, ref, cases, args.backend, device)
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if dist.get_rank() != 0:
            return 0
        rows = [r for rank_rows in gathered for r in rank_rows]
        bad = [r for r in rows if (r[3] != 0.0 if r[2].startswith("param:") else not r[3] <= tol)]
        worst: dict = {}
        for case, method, what, err in rows:
            if not what.startswith("param:") and err >= worst.get((case, method), (None, -1))[1]:
                worst[(case, method)] = (what, err)
        print(f"layout tp={args.tp} cp={args.cp} ep={args.ep} dp={topo.dp} backend={args.backend} "
              f"on {torch.cuda.get_device_name(device)}; tolerance {tol:g}")
        print(f"{'case':<8} {'method':<10} {'worst check':<48} rel err")
        for (case, method), (what, err) in worst.items():
            print(f"{case:<8} {method:<10} {what:<48} {err:.2e}")
        print(f"{len(rows) - len(bad)} of {len(rows)} checks pass")
        for r in bad[:20]:
            print("FAIL", r)
        return 1 if bad else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
