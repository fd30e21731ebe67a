"""``lsp-bench attention``: flash against cuDNN attention on the model's block shapes (GPU).

Times torch's flash and cuDNN attention ops, forward and backward (the backward given the
block's own output and log-sum-exp, as the balanced CP path calls it), on the blocks the 1M
experiment runs (B=1, H=8, d=128, bf16): the balanced CP attention's square causal and full
blocks, and the one-GPU layer path (:func:`lsp.layers.attention.causal_attention`, causal,
forward + backward through autograd). Inputs are ``[B, H, T, d]`` views of token-major memory,
as the layer passes them. CUDA events, a fixed number of loops after warm-up, one run; the same
run checks that outputs, log-sum-exp and gradients of the two backends agree to bf16 rounding.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

# (name, queries, keys, causal): the balanced CP blocks at 1M tokens on 2 GPUs and their halves
BLOCKS = [("32K x 32K causal", 32768, 32768, True),
          ("16K x 64K full", 16384, 65536, False),
          ("64K x 64K causal", 65536, 65536, True)]
LAYER_T = 32768  # the one-GPU layer path, causal
B, H, D = 1, 8, 128
TOL = 2e-2  # relative (norm) difference allowed between the backends in bf16


def _timed(fn, reps: int, warmup: int = 2) -> float:
    """Mean milliseconds of ``fn()`` over ``reps`` loops after ``warmup``, by CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _token_major(T: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(B, T, H, D, generator=gen, device="cuda", dtype=torch.float32)
    return x.to(torch.bfloat16).transpose(1, 2)  # [B, H, T, d] view


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def bench_block(name, Tq, Sk, causal, reps):
    from lsp.parallel.cp_attention import attention_backward, attention_forward, resolve_backend

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (_token_major(T, gen) for T in (Tq, Sk, Sk, Tq))
    row = dict(block=name, Tq=Tq, Sk=Sk, causal=causal)
    res = {}
    for backend in ("flash", "cudnn"):
        resolve_backend(backend, [(q, k, causal)])  # raises (with torch's reasons) if refused
        out, lse, st = attention_forward(q, k, v, causal, backend)
        grads = attention_backward(do, q, k, v, out, lse, causal, st, backend)
        res[backend] = (out, lse) + tuple(grads)
        row[f"{backend}_fwd_ms"] = _timed(lambda: attention_forward(q, k, v, causal, backend),
                                          reps)
        row[f"{backend}_bwd_ms"] = _timed(
            lambda: attention_backward(do, q, k, v, out, lse, causal, st, backend), reps)
        row[f"{backend}_fwdbwd_ms"] = row[f"{backend}_fwd_ms"] + row[f"{backend}_bwd_ms"]
        del out, lse, st, grads
    for i, part in enumerate(["out", "lse", "dq", "dk", "dv"]):
        row[f"rel_{part}"] = _rel(res["cudnn"][i], res["flash"][i])
    row["agree"] = all(row[f"rel_{p}"] < TOL for p in ["out", "lse", "dq", "dk", "dv"])
    return row


def bench_layer(T, reps):
    """The one-GPU layer path (``causal_attention``, autograd) per backend, forward + backward."""
    from lsp.layers.attention import causal_attention

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = [torch.randn(B, T, H, D, generator=gen, device="cuda").to(torch.bfloat16)
         for _ in range(4)]
    row = dict(block=f"layer {T // 1024}K causal (one GPU)", Tq=T, Sk=T, causal=True)
    res = {}
    for backend in ("flash", "cudnn"):
        q, k, v = (t.clone().requires_grad_() for t in x[:3])

        def step():
            for t in (q, k, v):
                t.grad = None
            o = causal_attention(q, k, v, backend=backend)
            o.backward(x[3])
            return o

        o = step()
        res[backend] = (o.detach(), q.grad, k.grad, v.grad)
        row[f"{backend}_fwdbwd_ms"] = _timed(step, reps)
    for i, part in enumerate(["out", "dq", "dk", "dv"]):
        row[f"rel_{part}"] = _rel(res["cudnn"][i], res["flash"][i])
    row["agree"] = all(row[f"rel_{p}"] < TOL for p in ["out", "dq", "dk", "dv"])
    return row


def _table(rows) -> str:
    head = (f"{'block':<28}{'flash fwd':>10}{'cuDNN fwd':>10}{'flash bwd':>10}{'cuDNN bwd':>10}"
            f"{'flash f+b':>10}{'cuDNN f+b':>10}{'speed-up':>9}  max rel diff")
    lines = [head, "-" * len(head)]
    for r in rows:
        f = lambda k: f"{r[k]:10.2f}" if k in r else f"{'':>10}"  # noqa: E731
        diff = max(v for k, v in r.items() if k.startswith("rel_"))
        lines.append(f"{r['block']:<28}{f('flash_fwd_ms')}{f('cudnn_fwd_ms')}{f('flash_bwd_ms')}"
                     f"{f('cudnn_bwd_ms')}{f('flash_fwdbwd_ms')}{f('cudnn_fwdbwd_ms')}"
                     f"{r['flash_fwdbwd_ms'] / r['cudnn_fwdbwd_ms']:8.2f}x  {diff:.1e}"
                     f"{'' if r['agree'] else '  DISAGREE'}")
    return "\n".join(lines) + "\n(milliseconds; B=1, H=8, d=128, bf16)"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="lsp-bench attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="attention.json", help="JSON output path")
    ap.add_argument("--reps", type=int, default=10, help="timed loops per measurement")
    ap.add_argument("--commit", default=os.environ.get("LSP_COMMIT", "unknown"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("lsp-bench attention times GPU kernels (torch's flash and cuDNN attention); "
                 "run it on a CUDA device")
    rows = [bench_block(*blk, a.reps) for blk in BLOCKS] + [bench_layer(LAYER_T, a.reps)]
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                cudnn=torch.backends.cudnn.version(), commit=a.commit, reps=a.reps,
                command="lsp-bench attention " + " ".join(argv if argv is not None
                                                          else sys.argv[2:]))
    print(_table(rows))
    with open(a.out, "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)
    if not all(r["agree"] for r in rows):
        sys.exit(f"flash and cuDNN disagree beyond {TOL} (relative): see {a.out}")


if __name__ == "__main__":
    main()
