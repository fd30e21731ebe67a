"""The exchange inside the kernels' op, on ranks simulated in one process on one GPU.

``sequence_parallel`` runs both op families on the Triton kernels with the state exchange inside
the op (``lsp.kernels.delta_rule(..., boundary=...)``, see ``parallel/sequence.py``). This script
checks that algebra at real sizes and times its local cost without a second GPU:

1. Correctness: ``P`` slices of one sequence run one after another in this process, each with a
   boundary that plays the exchange (the forward hands each slice the state its predecessors
   leave; the backward, run from the last slice to the first, hands each the gradient at its end).
   Outputs and every gradient (``q, k, v, beta, g`` and the initial state) are compared with the
   one-process op on the whole sequence, per family and gate kind (bfloat16 by default).
2. Local cost, fwd+bwd at ``T`` tokens: the op alone (one GPU on ``T``), and
   ``sequence_parallel`` on a one-rank group with the exchange inside the op and with the pairs
   of ``parallel/pairs.py`` (``sequence.EXCHANGE_IN_KERNELS`` off: the delta rule's op at value
   width ``V + K``, linear attention's closed-form pair and effective-query correction), which
   is what a rank ran before. ``in-op / op`` is the weak-scaling ratio a CP run would reach if
   its exchange (one ``[H, K, V]`` state each way per rank) cost nothing; it is not a
   multi-GPU measurement.

Prints a table and writes JSON; exits non-zero when a correctness row fails::

    python -m lsp.launch.check_sp_kernels --out sp_kernels.json [--commit SHA]
    python -m lsp.launch.check_sp_kernels --cpu-smoke --out s.json   # CPU, interpreter, tiny
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

import lsp
from lsp import kernels
from lsp.launch import bench_kernels as bk
from lsp.parallel import pairs, sequence, sequence_parallel
from lsp.testing import kernels_on_cpu, op_args, rel_err


def _kind(A) -> str:
    """The transition kind of a slice's ``A`` as the kernels hand it (``parallel/pairs.py``)."""
    return {None: "identity", 2: "scalar", 3: "diagonal", 4: "full"}[None if A is None
                                                                      else A.dim()]


class ChainBoundary:
    """The exchange of ``P`` slices run in order in one process (``forward`` for slice 0 first,
    ``backward`` for the last slice first): what ``parallel.exchange`` does across ranks."""

    def __init__(self):
        self.S = None  # the state the next slice starts from
        self.D = None  # the gradient at the end of the slice whose backward runs next

    def slice(self, first: bool):
        chain = self

        class _One:
            def __init__(self):
                self.first = first

            def forward(self, A, B, S_init):
                if chain.S is None:
                    chain.S = torch.zeros_like(B) if S_init is None else S_init.float()
                S_start = chain.S
                chain.S = pairs.apply(_kind(A), A, S_start) + B
                self.A = A
                return S_start, None

            def backward(self, G, dS_final):
                if chain.D is None:
                    chain.D = torch.zeros_like(G)
                D_end = chain.D
                chain.D = pairs.apply_adjoint(_kind(self.A), self.A, D_end) + G
                return D_end

        return _One()


def check(family: str, gate: str, dtype: torch.dtype, T: int, P: int, H: int, K: int = 128,
          V: int = 128, gate_scale: float = 0.002, seed: int = 0) -> dict:
    dev = bk.DEVICE
    op = getattr(kernels, family)
    a = bk.bench_inputs(family, gate, P * T, H=H, K=K, V=V, seed=seed)
    if "g" in a:  # weak decay, so that states cross chunks, segments and slices measurably
        a["g"] = a["g"].detach() * gate_scale
    a = {n: t.detach().to(dtype if n in ("q", "k", "v", "beta") else t.dtype).requires_grad_()
         for n, t in a.items()}
    B = 1
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    h0 = torch.randn(B, H, K, V, device=dev, generator=gen).requires_grad_()
    do = torch.randn(B, P * T, H, V, device=dev, generator=gen).to(dtype)
    names = list(a)
    o_ref, _ = op(*op_args(a), initial_state=h0)
    ref = torch.autograd.grad(o_ref, [a[n] for n in names] + [h0], do)
    ref = dict(zip(names + ["initial_state"], ref))

    chain = ChainBoundary()
    outs, shards = [], []
    for r in range(P):
        sl = slice(r * T, (r + 1) * T)
        s = {n: t.detach()[:, sl].requires_grad_() for n, t in a.items()}
        hr = h0.detach().clone().requires_grad_()
        o, _ = op(*op_args(s), initial_state=hr, boundary=chain.slice(r == 0))
        outs.append(o)
        shards.append((s, hr))
    grads = [None] * P
    for r in reversed(range(P)):  # the reverse exchange runs from the last slice to the first
        s, hr = shards[r]
        g = torch.autograd.grad(outs[r], list(s.values()) + [hr], do[:, r * T:(r + 1) * T])
        grads[r] = dict(zip(names + ["initial_state"], g))
    errs = {"o": rel_err(torch.cat(outs, 1), o_ref)}
    for n in names:
        errs["d" + n] = rel_err(torch.cat([g[n] for g in grads], 1), ref[n])
    errs["dinitial_state"] = rel_err(grads[0]["initial_state"], ref["initial_state"])
    errs["dinit_other_ranks_max"] = max(
        (g["initial_state"].abs().max().item() for g in grads[1:]), default=0.0)
    return errs


def one_rank_group() -> None:
    """A one-rank process group (NCCL on a GPU, gloo on the CPU) for ``sequence_parallel``."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(bk.DEVICE).startswith("cuda") else "gloo",
                                store=dist.HashStore(), world_size=1, rank=0)


def variants(family: str, a: dict, do: torch.Tensor) -> dict:
    """fwd+bwd closures: the op alone, and ``sequence_parallel`` on one rank with the exchange
    inside the op and with the pairs of ``parallel/pairs.py``; each returns its outputs."""
    leaves = list(a.values())
    op = getattr(lsp.ops, family)

    def plain():
        o, _ = getattr(kernels, family)(*op_args(a))
        return o, torch.autograd.grad(o, leaves, do)

    def sp(in_op: bool):
        def run():
            sequence.EXCHANGE_IN_KERNELS = in_op
            try:
                o, _ = sequence_parallel(op, *op_args(a), backend="triton", check=False)
            finally:
                sequence.EXCHANGE_IN_KERNELS = True
            return o, torch.autograd.grad(o, leaves, do)
        return run

    return {"op": plain, "in_op": sp(True), "pairs": sp(False)}


def timing(family: str, gate: str, T: int, H: int, n: int) -> dict:
    a = bk.bench_inputs(family, gate, T, H=H)
    V = a["v"].shape[-1]
    do = torch.randn(1, T, H, V, device=bk.DEVICE, dtype=torch.bfloat16)
    row = {"family": family, "gate": gate, "T": T, "H": H}
    for name, fn in variants(family, a, do).items():
        torch.cuda.reset_peak_memory_stats()
        row[f"{name}_ms"] = round(bk.timed(fn, n)[0], 3)
        row[f"{name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["in_op_over_op"] = round(row["in_op_ms"] / row["op_ms"], 3)
    row["pairs_over_op"] = round(row["pairs_ms"] / row["op_ms"], 3)
    return row


def smoke_variants(family: str, gate: str) -> float:
    """The timing's closures once on the CPU (tiny, interpreter): in-op and pairs agree."""
    a = bk.bench_inputs(family, gate, 100, H=2, K=16, V=16)
    a = {n: t.detach().float().requires_grad_() for n, t in a.items()}
    do = torch.randn(1, 100, 2, 16)
    outs = {name: fn() for name, fn in variants(family, a, do).items()}
    ref = outs["op"]
    return max(max(rel_err(x, y) for x, y in zip((o,) + g, (ref[0],) + ref[1]))
               for o, g in (outs["in_op"], outs["pairs"]))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lsp.launch.check_sp_kernels")
    p.add_argument("--out", default="sp_kernels.json")
    p.add_argument("--commit", default="")
    p.add_argument("--check-T", type=int, default=8192, help="tokens per simulated rank")
    p.add_argument("--check-P", type=int, default=3)
    p.add_argument("--check-H", type=int, default=4)
    p.add_argument("--check-K", type=int, default=128, help="key and value head dim")
    p.add_argument("--dtypes", default="bfloat16",
                   help="dtypes of the correctness part (float32 at K = 128 compiles slowly: "
                        "on an H200 one float32 check took about 100 s, mostly compiling)")
    p.add_argument("--families", default="delta_rule,linear_attention")
    p.add_argument("--gates", default="none,head,key")
    p.add_argument("--gate-scale", type=float, default=0.002,
                   help="log-gates of the check are logsigmoid(randn) times this")
    p.add_argument("--cases", default="delta_rule:head:65536:16,delta_rule:head:524288:8,"
                   "delta_rule:none:65536:16,delta_rule:key:65536:16,"
                   "linear_attention:none:65536:16,linear_attention:head:65536:16,"
                   "linear_attention:key:65536:16", help="family:gate:T:H rows of the timing")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--skip", default="", help="comma list of: check, time")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="CPU form (CI): the correctness part at a tiny shape, float32, under "
                        "Triton's interpreter; no timing")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.cpu_smoke:
        # the interpreter before lsp.kernels decorates its kernels; CPU tensors reach them
        # behind backend="triton" (on a GPU that path runs unpatched)
        kernels_on_cpu()
        bk.DEVICE = "cpu"
        skip.add("time")
        args.dtypes, args.check_T, args.check_H, args.check_K = "float32", 100, 2, 16
    on_gpu = torch.cuda.is_available() and str(bk.DEVICE).startswith("cuda")
    res = {"info": {"device": torch.cuda.get_device_name() if on_gpu else str(bk.DEVICE),
                    "torch": torch.__version__,
                    "commit": args.commit, "time": time.strftime("%Y-%m-%d %H:%M:%S")},
           "check": [], "timing": []}
    tol = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
    if "check" not in skip:
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            for family in args.families.split(","):
                for gate in args.gates.split(","):
                    errs = check(family, gate, dtype, args.check_T, args.check_P, args.check_H,
                                 args.check_K, args.check_K, args.gate_scale)
                    worst = max(v for n, v in errs.items() if n != "dinit_other_ranks_max")
                    ok = worst <= tol[dtype] and errs["dinit_other_ranks_max"] == 0.0
                    rec = dict(family=family, gate=gate, dtype=str(dtype).split(".")[-1], ok=ok,
                               worst=worst, tol=tol[dtype], **errs)
                    res["check"].append(rec)
                    print(("ok  " if ok else "FAIL"), f"{family:16s} {gate:5s} {rec['dtype']:9s} "
                          f"P={args.check_P} T={args.check_T} worst={worst:.2e} "
                          f"(tol {tol[dtype]:.0e})", {n: f"{v:.1e}" for n, v in errs.items()},
                          flush=True)
        print(f"correctness: {sum(r['ok'] for r in res['check'])}/{len(res['check'])} passed")
    if args.cpu_smoke:  # the timing's closures, run once: in-op and pairs agree with the op
        one_rank_group()
        for family in args.families.split(","):
            for gate in args.gates.split(","):
                err = smoke_variants(family, gate)
                res["check"].append(dict(family=family, gate=gate, dtype="float32",
                                         part="variants", ok=err <= 1e-5, worst=err))
                print(("ok  " if err <= 1e-5 else "FAIL"), f"variants {family} {gate}: "
                      f"in-op and pairs vs op {err:.1e}", flush=True)
    if "time" not in skip:
        one_rank_group()
        print(f"{'family':>16} {'gate':>5} {'T':>7} {'H':>3} | {'op ms':>8} {'in-op ms':>9} "
              f"{'pairs ms':>9} | {'in-op/op':>8} {'pairs/op':>8}")
        for spec in args.cases.split(","):
            family, gate, T, H = spec.split(":")
            row = timing(family, gate, int(T), int(H), args.iters)
            res["timing"].append(row)
            print(f"{family:>16} {gate:>5} {int(T):>7} {int(H):>3} | {row['op_ms']:>8.2f} "
                  f"{row['in_op_ms']:>9.2f} {row['pairs_ms']:>9.2f} | "
                  f"{row['in_op_over_op']:>8.3f} {row['pairs_over_op']:>8.3f}", flush=True)
            torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.destroy_process_group()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return all(r["ok"] for r in res["check"])


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
