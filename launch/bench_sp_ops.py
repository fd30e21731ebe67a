"""Weak scaling of delta-rule sequence parallelism: one GPU on L tokens against P GPUs on P x L.

Run with ``torchrun --nproc-per-node P -m lsp.launch.bench_sp_ops --out DIR``. Every rank holds
``T_local`` tokens (Gated DeltaNet by default: scalar gates, L2-normalised keys, bf16 q/k/v,
float32 beta and g, as the models keep them) and times forward + backward of:

- ``one GPU``: the op on its own ``T_local`` tokens (every rank at once, each on its GPU);
- ``CP=P <method>``: ``sequence_parallel`` over the ``P x T_local`` sequence (on the Triton
  backend the delta rule runs its exchange inside the op: ``parallel/sequence.py``);
- the parts of the CP step: the shard's transition and effective queries alone
  (``lsp.ops.delta_net.fixup.delta_rule_transition``, with a few chunk / block settings), and the op at value
  width ``V + K`` from the state ``[0 | I]`` (how a shard's pair was computed before the chunk
  transition algebra, kept here as the comparison);
- the same with TF32 matmuls allowed, with the error of TF32 and float32 transitions against a
  float64 one on the same shard;
- with ``--fla``: fla 0.6.0's Gated DeltaNet on ``T_local`` and fla's own context parallelism
  (``fla.ops.cp``) over ``P x T_local``, on the same inputs.

Each row is a fixed loop of ``--iters`` steps after ``--warmup`` steps, between barriers, timed
with CUDA events (host clock on CPU); the reported time is the slowest rank's. The weak-scaling
ratio is ``CP time / one-GPU time``. Rank 0 prints a table and writes ``bench_sp_ops.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lsp
from lsp.ops.delta_net.fixup import delta_rule_transition
from lsp.launch.dist_env import init_from_environment
from lsp.parallel import sequence_parallel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lsp.launch.bench_sp_ops")
    p.add_argument("--out", default="runs/bench_sp_ops")
    p.add_argument("--commit", default=os.environ.get("LSP_COMMIT", "unknown"),
                   help="commit recorded in the JSON (as bench_kernels)")
    p.add_argument("--T-local", type=int, default=65536, help="tokens per rank")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--gate", choices=("none", "head", "key"), default="head")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--backend", default="auto", help="op backend: auto, torch or triton")
    p.add_argument("--methods", default="allscan,allgather")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-parts", action="store_true", help="skip the fix-up rows")
    p.add_argument("--sweep", action="store_true",
                   help="also time other chunk / block / memory settings of the fix-up and TF32")
    p.add_argument("--fla", action="store_true",
                   help="also time fla 0.6.0 (Gated DeltaNet only): its op on T_local and its own "
                        "context parallelism (fla.ops.cp) over P x T_local")
    p.add_argument("--old-pair", action="store_true",
                   help="also time the op at width V + K from [0 | I] (compiles another kernel)")
    return p.parse_args(argv)


def make_inputs(args, rank: int, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
    B, T, H, K, V = args.B, args.T_local, args.H, args.K, args.V
    dt = DTYPES[args.dtype]

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(device)

    a = {"q": rnd(B, T, H, K).to(dt), "k": F.normalize(rnd(B, T, H, K), dim=-1).to(dt),
         "v": rnd(B, T, H, V).to(dt), "beta": torch.sigmoid(rnd(B, T, H))}
    if args.gate != "none":
        a["g"] = F.logsigmoid(rnd(*((B, T, H) if args.gate == "head" else (B, T, H, K))))
    a = {n: t.requires_grad_() for n, t in a.items()}
    a["do"] = rnd(B, T, H, V).to(dt)
    return a


def timed(fn, warmup: int, iters: int, device: torch.device) -> dict:
    """Slowest rank's milliseconds per step of ``fn`` and its peak memory (GiB)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / iters
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / iters
        peak = float("nan")
    t = torch.tensor([ms, peak], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {"ms": t[0].item(), "peak_gib": t[1].item()}


def _rel(x, ref) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def fla_rows(args, a, pos, clear, add, rows, W, P):
    """fla 0.6.0 on the same inputs: one GPU on ``T_local``, and fla's context parallelism over
    the ``P x T_local`` sequence (each rank its contiguous slice, as ours). fla refuses its gated
    backward on Hopper with Triton < 3.7.1 (fla #640); for this baseline timing the guard
    ``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1`` is set (fla's gradients are not checked)."""
    if args.gate != "head" or args.B != 1:
        raise ValueError(f"--fla times Gated DeltaNet with B=1 (fla's CP takes one packed "
                         f"sequence); got --gate {args.gate} --B {args.B}")
    import fla.ops.common.chunk_o as fla_chunk_o
    from fla.ops.cp import build_cp_context
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    fla_chunk_o.TRITON_ABOVE_3_7_1 = True
    q, k, v, beta, g = pos
    scale = args.K**-0.5

    def one():
        clear()
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)
        o.backward(a["do"])

    total = P * args.T_local
    ctx = build_cp_context(torch.tensor([0, total], dtype=torch.long, device=q.device),
                           group=dist.group.WORLD)

    def cp():
        clear()
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, cp_context=ctx)
        o.backward(a["do"])

    add("fla 0.6.0: op fwd+bwd on T_local", timed(one, **W))
    base = rows[-1]["ms"]
    add(f"fla 0.6.0: CP={P} fwd+bwd on {P} x T_local", timed(cp, **W))
    rows[-1]["weak_scaling_ratio"] = rows[-1]["ms"] / base


def main(argv=None):
    args = parse_args(argv)
    rank, P, local = init_from_environment("auto")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    op = lsp.ops.delta_rule
    a = make_inputs(args, rank, device)
    leaves = [a[n] for n in ("q", "k", "v", "beta", "g") if n in a]
    pos = [a["q"], a["k"], a["v"], a["beta"], a.get("g")]
    W = {"warmup": args.warmup, "iters": args.iters, "device": device}
    rows = []

    def clear():
        for t in leaves:
            t.grad = None

    def save():  # after every row, so that a run cut short keeps what it measured
        if rank == 0:
            doc = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "world_size": P, "torch": torch.__version__, "args": vars(args), "rows": rows}
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "bench_sp_ops.json"), "w") as f:
                json.dump(doc, f, indent=1)

    def add(name, res, **extra):
        rows.append(dict(name=name, **res, **extra))
        if rank == 0:
            print(f"{name:52} {res['ms']:9.2f} ms  peak {res['peak_gib']:6.2f} GiB", flush=True)
        save()

    def one_gpu():
        clear()
        o, _ = op(*pos, backend=args.backend)
        o.backward(a["do"])

    def cp(method):
        def step():
            clear()
            o, _ = sequence_parallel(op, *pos, method=method, backend=args.backend, check=False)
            o.backward(a["do"])
        return step

    # one checked call first: the ranks agree on the shapes (check=False in the timed loops)
    sequence_parallel(op, *pos, method="allscan", backend=args.backend, check=True)
    add("one GPU: op fwd+bwd on T_local", timed(one_gpu, **W))
    base = rows[-1]["ms"]
    for method in args.methods.split(","):
        add(f"CP={P} {method} fwd+bwd on {P} x T_local", timed(cp(method), **W), method=method)
        rows[-1]["weak_scaling_ratio"] = rows[-1]["ms"] / base
        save()

    if args.fla:
        fla_rows(args, a, pos, clear, add, rows, W, P)

    if not args.no_parts:
        B, T, H, K, V = args.B, args.T_local, args.H, args.K, args.V
        scale = K**-0.5
        gen = torch.Generator(device="cpu").manual_seed(7)
        dP = torch.randn(B, H, K, K, generator=gen).to(device)
        dqe = torch.randn(B, T, H, K, generator=gen).to(device)

        def fixup(**kw):
            def step():
                clear()
                Pn, qe = delta_rule_transition(a["q"], a["k"], a["beta"], a.get("g"), scale=scale, **kw)
                torch.autograd.backward([Pn, qe], [dP, dqe])
            return step

        def fixup_fwd():
            with torch.no_grad():
                delta_rule_transition(a["q"], a["k"], a["beta"], a.get("g"), scale=scale)

        N = -(-T // 64)
        add("fix-up fwd (chunk 64, default blocks)", timed(fixup_fwd, **W))
        add(f"fix-up fwd+bwd (chunk 64, blocks of {math.isqrt(N)})", timed(fixup(), **W))
    if not args.no_parts and args.sweep:
        for C, nb in ((64, 16), (64, 64), (128, None), (32, None)):
            add(f"fix-up fwd+bwd (chunk {C}, blocks of {nb or math.isqrt(-(-T // C))})",
                timed(fixup(chunk_size=C, block_chunks=nb), **W), chunk=C, block_chunks=nb)
        add("fix-up fwd+bwd (chunk 64, group_bytes 4 GiB)",
            timed(fixup(group_bytes=4 << 30), **W))
        add("fix-up fwd+bwd (chunk 64, no recompute)", timed(fixup(recompute=False), **W))

    if not args.no_parts and args.old_pair:
        B, T, H, K, V = args.B, args.T_local, args.H, args.K, args.V
        v_aug = torch.cat([a["v"].detach(), a["v"].new_zeros(B, T, H, K)], dim=-1).requires_grad_()
        s0 = torch.cat([torch.zeros(B, H, K, V, device=device),
                        torch.eye(K, device=device).expand(B, H, K, K)], dim=-1)
        do_aug = torch.cat([a["do"], a["do"].new_zeros(B, T, H, K)], dim=-1)

        def wide():
            clear()
            v_aug.grad = None
            o, _ = op(a["q"], a["k"], v_aug, a["beta"], a.get("g"), initial_state=s0,
                      output_final_state=True, backend=args.backend)
            o.backward(do_aug)
        add("op fwd+bwd at width V+K from [0 | I] (the old pair)", timed(wide, **W))

    if not args.no_parts and args.sweep and device.type == "cuda":
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            add("fix-up fwd+bwd, TF32 matmuls", timed(fixup(), **W))
            add(f"CP={P} allscan fwd+bwd, TF32 matmuls", timed(cp("allscan"), **W),
                method="allscan", tf32=True)
            rows[-1]["weak_scaling_ratio"] = rows[-1]["ms"] / base
            save()
            with torch.no_grad():
                P32t, qe32t = delta_rule_transition(a["q"], a["k"], a["beta"], a.get("g"), scale=scale)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    if not args.no_parts:
        with torch.no_grad():
            P32, qe32 = delta_rule_transition(a["q"], a["k"], a["beta"], a.get("g"), scale=scale)
            P64, qe64 = delta_rule_transition(a["q"].double(), a["k"].double(), a["beta"].double(),
                                         None if a.get("g") is None else a["g"].double(),
                                         scale=scale)
        e = [_rel(qe32, qe64), (P32 - P64).norm().item()]
        if args.sweep and device.type == "cuda":
            e += [_rel(qe32t, qe64), (P32t - P64).norm().item()]
        errs = torch.tensor(e, dtype=torch.float64,
                            device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
        names = ["qe_rel_fp32", "P_abs_fp32", "qe_rel_tf32", "P_abs_tf32"]
        rows.append({"name": "transition error vs float64 (max over ranks)",
                     **dict(zip(names, errs.tolist())), "P64_norm": P64.norm().item()})
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)

    save()
    if rank == 0:
        print(f"\n{'row':52} {'ms':>9} {'ratio':>6}")
        for r in rows:
            if "ms" in r:
                ratio = f"{r['weak_scaling_ratio']:6.2f}" if "weak_scaling_ratio" in r else ""
                print(f"{r['name']:52} {r['ms']:9.2f} {ratio}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
