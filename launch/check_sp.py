"""GPU check of sequence parallelism on NCCL: every family x gate x method x dtype.

Run with ``torchrun --nproc-per-node G -m lsp.launch.check_sp --out DIR``. Every rank draws the
same full-sequence inputs, runs the op on the whole sequence on its own GPU in float64 (the
reference), runs ``sequence_parallel`` on its shard in the tested dtype, and compares outputs,
the final state and every gradient (relative error; bf16 <= 2e-2, fp32 <= 1e-4, float64 <= 1e-9;
NaN fails). Outputs are poisoned (NaN) on the tested path's cotangent side first so an unwritten
element shows. Rank 0 prints a table and writes ``check_sp.json``; the exit code is non-zero on
any failure.

``--packed`` checks packed documents instead: the global ``cu_seqlens`` of documents with
boundaries inside the shards, a document longer than a shard across a rank edge and one-token
documents (``mixed``), and of one document over whole shards (``spanning``), against the packed op on the whole sequence in float64 (per-document final states,
and the per-document initial states' gradient summed over the ranks, where it arrives on the
rank each document starts on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import lsp
from lsp.launch.dist_env import init_from_environment
from lsp.parallel import METHODS, sequence_parallel
from lsp.testing import FAMILIES, GATES, make_inputs, op_args, rel_err

OPS = {"linear_attention": lsp.ops.linear_attention, "delta_rule": lsp.ops.delta_rule}
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}


def check(rank, P, family, gate, method, dtype, backend, B, Tl, H, K, V, device):
    # float64 draws on the CPU, then moved: every rank and device sees the same inputs
    full = {n: t.detach().to(device).requires_grad_()
            for n, t in make_inputs(family, gate, B, P * Tl, H, K, V, seed=7).items()}
    op = OPS[family]
    gen = torch.Generator(device="cpu").manual_seed(8)
    do = torch.randn(B, P * Tl, H, V, generator=gen, dtype=torch.float64).to(device)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(device)
    o_ref, S_ref = op(*op_args(full), initial_state=full["initial_state"],
                      output_final_state=True, backend="torch")
    names = list(full)
    ref_g = dict(zip(names, torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(),
                                                [full[n] for n in names])))
    sl = slice(rank * Tl, (rank + 1) * Tl)
    sh = {n: t.detach()[:, sl].to(dtype).requires_grad_() for n, t in full.items()
          if n not in ("initial_state", "g", "beta")}
    for n in ("g", "beta"):  # gates and beta stay float32, as models keep them
        if n in full:
            sh[n] = full[n].detach()[:, sl].float().requires_grad_()
    init = full["initial_state"].detach().float().requires_grad_()
    o, S = sequence_parallel(op, *op_args(sh), method=method, initial_state=init,
                             output_final_state=True, backend=backend)
    loss = (o.float() * do[:, sl].float()).sum() + (S * dS.float()).sum() * (1.0 if rank == 0 else 0.0)
    leaves = dict(sh, initial_state=init)
    gr = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    errs = {"o": rel_err(o, o_ref[:, sl]), "S": rel_err(S, S_ref)}
    for n, t in gr.items():
        if n == "initial_state":
            errs["dinit"] = rel_err(t, ref_g[n]) if rank == 0 else t.abs().max().item()
        else:
            errs["d" + n] = rel_err(t, ref_g[n][:, sl])
    return errs


LAYOUTS = ("mixed", "spanning")


def packed_offsets(P: int, Tl: int, layout: str = "mixed") -> list[int]:
    """Offsets over ``P * Tl`` tokens.

    ``mixed``: a one-token document first, boundaries inside every shard, a document longer
    than a shard across each rank edge, a few one-token ones. ``spanning``: boundaries in the
    first shard only, then one document over every other shard to the end (shards with no
    boundary inside, which run as unpacked shards; on the kernels with the exchange inside the
    op, the last one returning the document's final state)."""
    if layout == "spanning":
        return [0, 1, Tl // 2, P * Tl]
    cuts = {0, 1, P * Tl}
    for r in range(P):  # early in the first shard, then half-way into the others
        t = r * Tl + (Tl // 8 if r == 0 else Tl // 2)
        cuts |= {t, t + 1, t + 2, t + 3}
    return sorted(cuts)


def check_packed(rank, P, family, gate, method, dtype, backend, Tl, H, K, V, device,
                 layout="mixed"):
    offsets = packed_offsets(P, Tl, layout)
    T, N = P * Tl, len(offsets) - 1
    full = {n: t.detach().to(device).requires_grad_()
            for n, t in make_inputs(family, gate, 1, T, H, K, V, seed=9,
                                    with_state=False).items()}
    gen = torch.Generator(device="cpu").manual_seed(10)
    full["initial_state"] = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64).to(
        device).requires_grad_()
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    op = OPS[family]
    do = torch.randn(1, T, H, V, generator=gen, dtype=torch.float64).to(device)
    dS = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64).to(device)
    o_ref, S_ref = op(*op_args(full), initial_state=full["initial_state"],
                      output_final_state=True, backend="torch", cu_seqlens=cu)
    names = list(full)
    ref_g = dict(zip(names, torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(),
                                                [full[n] for n in names])))
    sl = slice(rank * Tl, (rank + 1) * Tl)
    sh = {n: t.detach()[:, sl].to(dtype if n in ("q", "k", "v") else torch.float32)
          .requires_grad_() for n, t in full.items() if n != "initial_state"}
    init = full["initial_state"].detach().float().requires_grad_()
    o, S = sequence_parallel(op, *op_args(sh), method=method, initial_state=init,
                             output_final_state=True, backend=backend, cu_seqlens=cu)
    loss = ((o.float() * do[:, sl].float()).sum()
            + (S * dS.float()).sum() * (1.0 if rank == 0 else 0.0))
    leaves = dict(sh, initial_state=init)
    gr = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    errs = {"o": rel_err(o, o_ref[:, sl]), "S": rel_err(S, S_ref)}
    for n, t in gr.items():
        if n == "initial_state":  # each document's arrives on the rank where it starts
            total = t.detach().clone()
            dist.all_reduce(total)
            errs["dinit"] = rel_err(total, ref_g[n])
        else:
            errs["d" + n] = rel_err(t, ref_g[n][:, sl])
    return errs


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lsp.launch.check_sp")
    p.add_argument("--out", default="runs/check_sp")
    p.add_argument("--backends", default="torch", help="comma-separated op backends to check")
    p.add_argument("--shape", default="1x200x4x32x48", help="B x T_local x H x K x V")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated tested dtypes")
    p.add_argument("--cases", default="",
                   help="comma-separated family:gate pairs to check (default: all)")
    p.add_argument("--packed", action="store_true",
                   help="packed documents (global cu_seqlens, B = 1) instead of one sequence")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"document layouts checked with --packed, of {LAYOUTS}")
    args = p.parse_args(argv)
    bad = set(args.layouts.split(",")) - set(LAYOUTS)
    if bad:
        p.error(f"--layouts: unknown {sorted(bad)}; choose from {LAYOUTS}")
    rank, P, local = init_from_environment("auto")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    B, Tl, H, K, V = (int(x) for x in args.shape.split("x"))
    rows, ok = [], True
    for backend in args.backends.split(","):
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            for family in FAMILIES:
                for gate in GATES:
                    if args.cases and f"{family}:{gate}" not in args.cases.split(","):
                        continue
                    for method, layout in [(m, lay) for m in METHODS for lay in
                                           (args.layouts.split(",") if args.packed else [None])]:
                        if args.packed:
                            errs = check_packed(rank, P, family, gate, method, dtype, backend,
                                                Tl, H, K, V, device, layout)
                        else:
                            errs = check(rank, P, family, gate, method, dtype, backend, B, Tl,
                                         H, K, V, device)
                        allerrs = [None] * P
                        dist.all_gather_object(allerrs, errs)
                        worst = {n: max(e[n] for e in allerrs) if all(e[n] == e[n] for e in allerrs)
                                 else float("nan") for n in errs}
                        passed = all(v <= TOL[dtype] for v in worst.values())
                        ok &= passed
                        rows.append({"backend": backend, "dtype": str(dtype).split(".")[-1],
                                     "packed": args.packed, "layout": layout,
                                     "family": family, "gate": gate, "method": method, "P": P,
                                     "max_rel_err": worst, "passed": passed})
                        if rank == 0:
                            print(f"{backend:6} {rows[-1]['dtype']:8} {family:16} {gate:6} {method:9} "
                                  f"{layout or '':8} "
                                  f"worst {max(worst.values()):.2e} {'ok' if passed else 'FAIL ' + str(worst)}",
                                  flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        doc = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "world": P, "backend": dist.get_backend(), "torch": torch.__version__,
               "shape": args.shape, "rows": rows, "all_passed": ok,
               "offsets": ({lay: packed_offsets(P, Tl, lay) for lay in args.layouts.split(",")}
                           if args.packed else None)}
        with open(os.path.join(args.out, "check_sp.json"), "w") as f:
            json.dump(doc, f, indent=1)
        print("ALL PASSED" if ok else "SOME CHECKS FAILED")
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
