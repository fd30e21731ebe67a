"""The delta rule's exchange inside the kernels, on ranks simulated in one process on one GPU.

``sequence_parallel`` runs the delta rule on the Triton kernels with the state exchange inside
the op (``lsp.kernels.delta_rule(..., boundary=...)``, see ``parallel/sequence.py``). This script
checks that algebra at real sizes and times its local cost without a second GPU:

1. Correctness: ``P`` slices of one sequence run one after another in this process, each with a
   boundary that plays the exchange (the forward hands each slice the state its predecessors
   leave; the backward, run from the last slice to the first, hands each the gradient at its end).
   Outputs and every gradient (``q, k, v, beta, g`` and the initial state) are compared with the
   one-process op on the whole sequence, per gate kind, in float32 and bfloat16.
2. Local cost, fwd+bwd at ``T`` tokens a slice: the op alone (one GPU on ``T``); one middle rank's
   op with the boundary (a random incoming state and end gradient, no communication); and the
   op at value width ``V + K`` from ``[0 | I]``, what a rank ran before (and still runs on the
   torch path). ``boundary / op`` is the weak-scaling ratio a CP run would reach if its exchange
   (one ``[H, K, V]`` state each way per rank) cost nothing; it is not a multi-GPU measurement.

Prints a table and writes JSON; exits non-zero when a correctness row fails::

    python -m lsp.launch.check_sp_kernels --out sp_kernels.json [--commit SHA]
    python -m lsp.launch.check_sp_kernels --cpu-smoke --out s.json   # CPU, interpreter, tiny
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lsp import kernels
from lsp.launch import bench_kernels as bk
from lsp.testing import rel_err


class ChainBoundary:
    """The exchange of ``P`` slices run in order in one process (``forward`` for slice 0 first,
    ``backward`` for the last slice first): what ``parallel.exchange`` does across ranks."""

    def __init__(self):
        self.S = None  # the state the next slice starts from
        self.D = None  # the gradient at the end of the slice whose backward runs next
        self.As = []

    def slice(self, first: bool):
        chain = self

        class _One:
            def __init__(self):
                self.first = first

            def forward(self, A, B, S_init):
                if chain.S is None:
                    chain.S = torch.zeros_like(B) if S_init is None else S_init.float()
                S_start = chain.S
                chain.S = A @ S_start + B
                self.A = A
                return S_start, None

            def backward(self, G, dS_final):
                if chain.D is None:
                    chain.D = torch.zeros_like(G)
                D_end = chain.D
                chain.D = self.A.transpose(-1, -2) @ D_end + G
                return D_end

        return _One()


class FixedBoundary:
    """One middle rank: a given incoming state and end gradient (for timing)."""

    first = False

    def __init__(self, S, D):
        self.S, self.D = S, D

    def forward(self, A, B, S_init):
        return self.S, None

    def backward(self, G, dS_final):
        return self.D


def _args(a):
    return a["q"], a["k"], a["v"], a["beta"], a.get("g")


def check(gate: str, dtype: torch.dtype, T: int, P: int, H: int, K: int = 128, V: int = 128,
          gate_scale: float = 0.002, seed: int = 0) -> dict:
    dev = bk.DEVICE
    a = bk.bench_inputs("delta_rule", gate, P * T, H=H, K=K, V=V, seed=seed)
    if "g" in a:  # weak decay, so that states cross chunks, segments and slices measurably
        a["g"] = a["g"].detach() * gate_scale
    a = {n: t.detach().to(dtype if n in ("q", "k", "v", "beta") else t.dtype).requires_grad_()
         for n, t in a.items()}
    B = 1
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    h0 = torch.randn(B, H, K, V, device=dev, generator=gen).requires_grad_()
    do = torch.randn(B, P * T, H, V, device=dev, generator=gen).to(dtype)
    names = list(a)
    o_ref, _ = kernels.delta_rule(*_args(a), initial_state=h0)
    ref = torch.autograd.grad(o_ref, [a[n] for n in names] + [h0], do)
    ref = dict(zip(names + ["initial_state"], ref))

    chain = ChainBoundary()
    outs, shards = [], []
    for r in range(P):
        sl = slice(r * T, (r + 1) * T)
        s = {n: t.detach()[:, sl].requires_grad_() for n, t in a.items()}
        hr = h0.detach().clone().requires_grad_()
        o, _ = kernels.delta_rule(*_args(s), initial_state=hr, boundary=chain.slice(r == 0))
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



def timing(T: int, H: int, n: int, gate: str = "head") -> dict:
    a = bk.bench_inputs("delta_rule", gate, T, H=H)
    B, K, V = 1, a["q"].shape[-1], a["v"].shape[-1]
    leaves = list(a.values())
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    S = 0.1 * torch.randn(B, H, K, V, device="cuda")
    D = 0.1 * torch.randn(B, H, K, V, device="cuda")

    def plain():
        o, _ = kernels.delta_rule(*_args(a))
        torch.autograd.grad(o, leaves, do)

    def boundary():
        o, _ = kernels.delta_rule(*_args(a), boundary=FixedBoundary(S, D))
        torch.autograd.grad(o, leaves, do)

    s0 = torch.cat([torch.zeros(B, H, K, V, device="cuda"),
                    torch.eye(K, device="cuda").expand(B, H, K, K)], -1)
    do_aug = torch.cat([do, do[..., :K]], -1)

    def wide():
        q, k, v, beta, g = _args(a)
        va = torch.cat([v, v.new_zeros(B, T, H, K)], -1)
        o, st = kernels.delta_rule(q, k, va, beta, g, initial_state=s0, output_final_state=True)
        torch.autograd.grad([o, st], leaves, [do_aug, torch.ones_like(st)])

    row = {"T": T, "H": H, "gate": gate}
    for name, fn in (("op_ms", plain), ("boundary_ms", boundary), ("v_plus_k_ms", wide)):
        torch.cuda.reset_peak_memory_stats()
        row[name] = round(bk.timed(fn, n)[0], 3)
        row[name.replace("_ms", "_peak_gib")] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["boundary_over_op"] = round(row["boundary_ms"] / row["op_ms"], 3)
    row["v_plus_k_over_op"] = round(row["v_plus_k_ms"] / row["op_ms"], 3)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lsp.launch.check_sp_kernels")
    p.add_argument("--out", default="sp_kernels.json")
    p.add_argument("--commit", default="")
    p.add_argument("--check-T", type=int, default=8192, help="tokens per simulated rank")
    p.add_argument("--check-P", type=int, default=3)
    p.add_argument("--check-H", type=int, default=4)
    p.add_argument("--check-K", type=int, default=128, help="key and value head dim")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--gates", default="none,head,key")
    p.add_argument("--gate-scale", type=float, default=0.002,
                   help="log-gates of the check are logsigmoid(randn) times this")
    p.add_argument("--shapes", default="65536:16,524288:8", help="T:H rows of the timing")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--skip", default="", help="comma list of: check, time")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="CPU form (CI): the correctness part at a tiny shape, float32, under "
                        "Triton's interpreter; no timing")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.cpu_smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before lsp.kernels decorates its kernels
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
            for gate in args.gates.split(","):
                errs = check(gate, dtype, args.check_T, args.check_P, args.check_H,
                             args.check_K, args.check_K, args.gate_scale)
                worst = max(v for n, v in errs.items() if n != "dinit_other_ranks_max")
                ok = worst <= tol[dtype] and errs["dinit_other_ranks_max"] == 0.0
                rec = dict(gate=gate, dtype=str(dtype).split(".")[-1], ok=ok, worst=worst,
                           tol=tol[dtype], **errs)
                res["check"].append(rec)
                print(("ok  " if ok else "FAIL"), f"{gate:5s} {rec['dtype']:9s} P={args.check_P}"
                      f" T={args.check_T} worst={worst:.2e} (tol {tol[dtype]:.0e})",
                      {n: f"{v:.1e}" for n, v in errs.items()}, flush=True)
        print(f"correctness: {sum(r['ok'] for r in res['check'])}/{len(res['check'])} passed")
    if "time" not in skip:
        print(f"{'T':>8} {'H':>3} | {'op ms':>8} {'boundary ms':>12} {'V+K ms':>8} | "
              f"{'bnd/op':>6} {'V+K/op':>6}")
        for spec in args.shapes.split(","):
            T, H = (int(x) for x in spec.split(":"))
            row = timing(T, H, args.iters)
            res["timing"].append(row)
            print(f"{T:>8} {H:>3} | {row['op_ms']:>8.2f} {row['boundary_ms']:>12.2f} "
                  f"{row['v_plus_k_ms']:>8.2f} | {row['boundary_over_op']:>6.3f} "
                  f"{row['v_plus_k_over_op']:>6.3f}", flush=True)
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return all(r["ok"] for r in res["check"])


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
