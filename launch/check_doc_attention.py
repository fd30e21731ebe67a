"""GPU check and cost of document-causal softmax attention (packed documents).

1. Correctness: :func:`lsp.layers.doc_attention.document_causal_attention` in bf16 on each
   attention backend (``auto``, ``cudnn``, ``flash``; ``math`` on the CPU) against float64
   causal attention run on each document alone: outputs and the gradients of q, k and v
   (relative error <= 2e-2 in bf16, 1e-9 in float64). Under ``torchrun`` with several ranks
   (NCCL), each rank checks its slice of the sequence, gathered and with the balanced layout.
2. Cost (one process, GPU): forward + backward at ``--tokens`` tokens, B=1, H=8, d=128, bf16,
   for several packings against causal attention over the whole sequence (the unpacked layer
   path), CUDA events around a fixed number of loops.

Prints tables and writes JSON::

    python -m lsp.launch.check_doc_attention --out doc_attention.json
    torchrun --nproc-per-node 2 -m lsp.launch.check_doc_attention --out doc_attention_cp2.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

TOL = {torch.bfloat16: 2e-2, torch.float64: 1e-9}
H, HKV = 8, 4


def reference(q, k, v, rows):
    """Causal attention of each document alone, in float64 (``[B, T, H, d]`` token-major)."""
    outs = []
    for b, offs in enumerate(rows):
        parts = []
        for s, e in zip(offs[:-1], offs[1:]):
            qd, kd, vd = (t[b:b + 1, s:e].transpose(1, 2).double() for t in (q, k, v))
            kd, vd = kd.repeat_interleave(H // HKV, 1), vd.repeat_interleave(H // HKV, 1)
            parts.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
                         .transpose(1, 2))
        outs.append(torch.cat(parts, dim=1))
    return torch.cat(outs)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(rows, T, d, dtype, backend, device, group=None, balance=False):
    """One case; returns its record (errors per tensor, ok)."""
    from lsp.layers.doc_attention import document_causal_attention

    P = torch.distributed.get_world_size(group) if group is not None else 1
    r = torch.distributed.get_rank(group) if group is not None else 0
    gen = torch.Generator().manual_seed(5)
    B = len(rows)
    q, do = (torch.randn(B, T, H, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, T, HKV, d, generator=gen, dtype=torch.float64) for _ in range(2))
    full = [t.to(device).requires_grad_() for t in (q, k, v)]
    o_ref = reference(*full, rows)
    g_ref = torch.autograd.grad((o_ref * do.to(device)).sum(), full)
    Tl = T // P
    sl = slice(r * Tl, (r + 1) * Tl)
    mine = [t.detach()[:, sl].to(dtype).requires_grad_() for t in full]
    cu = [torch.tensor(offs, device=device) for offs in rows]
    rec = dict(rows=rows, T=T, d=d, dtype=str(dtype).replace("torch.", ""), backend=backend,
               ranks=P, balance=balance)
    try:
        o = document_causal_attention(*mine, cu, group, balance, backend)
        g = torch.autograd.grad((o * do[:, sl].to(device, o.dtype)).sum(), mine)
        # a rank's key and value gradients: its slice's, from every rank's queries (the
        # all-gather's backward sums them)
        errs = {"o": rel(o, o_ref[:, sl])}
        errs.update({n: rel(x, y[:, sl]) for n, x, y in zip(("dq", "dk", "dv"), g, g_ref)})
        rec.update(errs=errs, ok=all(e <= TOL[dtype] for e in errs.values()))
    except Exception as exc:  # keep going; the table says what broke
        rec.update(ok=False, error=repr(exc)[:400])
    return rec


def packings(T: int) -> dict:
    docs = {"1 document": [0, T], f"{T // 2048} x 2K": list(range(0, T + 1, 2048)),
            f"{T // 512} x 512": list(range(0, T + 1, 512))}
    long_doc = T * 3 // 4
    docs[f"{long_doc // 1024}K + {(T - long_doc) // 256} x 256"] = [0] + list(
        range(long_doc, T + 1, 256))
    return docs


def cost(T, reps, backend):
    from lsp.launch.bench_attention import _timed as timed
    from lsp.layers.attention import causal_attention
    from lsp.layers.doc_attention import document_causal_attention

    d = 128
    q, k, v = (torch.randn(1, T, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (H, HKV, HKV))
    do = torch.randn(1, T, H, d, device="cuda", dtype=torch.bfloat16)
    rows = []

    def run(fn):
        o = fn()
        torch.autograd.grad(o, (q, k, v), do)

    base = timed(lambda: run(lambda: causal_attention(q, k, v, backend=backend)), reps)
    rows.append(dict(layout="unpacked causal (whole sequence)", ms=base, x=1.0))
    for name, offs in packings(T).items():
        cu = torch.tensor(offs, device="cuda")
        ms = timed(lambda: run(lambda: document_causal_attention(q, k, v, cu, backend=backend)),
                   reps)
        rows.append(dict(layout=name, docs=len(offs) - 1, ms=ms, x=ms / base))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--commit", default=os.environ.get("LSP_COMMIT", "unknown"))
    ap.add_argument("--tokens", type=int, default=32768, help="tokens of the timed sequence")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma list of: check,time")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    cuda = torch.cuda.is_available()
    group = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from lsp.launch.dist_env import init_from_environment

        if cuda:  # this rank's GPU before the process group touches one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_from_environment("nccl" if cuda else "gloo")
        group = torch.distributed.group.WORLD
    rank = torch.distributed.get_rank() if group is not None else 0
    P = torch.distributed.get_world_size() if group is not None else 1
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype, backends = ((torch.bfloat16, ("auto", "cudnn", "flash")) if cuda
                       else (torch.float64, ("math",)))
    result = dict(info=dict(device=torch.cuda.get_device_name() if cuda else "cpu",
                            torch=torch.__version__, commit=args.commit, ranks=P,
                            command=" ".join(sys.argv)))
    bad = 0
    if "check" not in skip:
        T = 384 * P
        # a one-token document, documents across rank edges, one longer than a shard
        rows = [[0, 1, 64, 65, 200, T - 100, T], [0, 300, T]]
        recs = []
        for backend in backends:
            for balance in ((False, True) if P > 1 else (False,)):
                # cuDNN cannot align the lower-right block of a document continuing from an
                # earlier rank (gathered layout): that case must raise, not run something else
                expect_error = backend == "cudnn" and P > 1 and not balance
                rec = check(rows, T, 64, dtype, backend, device, group, balance)
                if expect_error:
                    rec["ok"] = "error" in rec and "cuDNN" in rec["error"]
                    rec["expected"] = "a ValueError naming cuDNN's causal alignment"
                recs.append(rec)
                bad += not rec["ok"]
                if rank == 0:
                    tag = f"{backend:6s} ranks={P} balance={balance!s:5s}"
                    detail = rec.get("error") or " ".join(f"{k}={e:.1e}"
                                                          for k, e in rec["errs"].items())
                    print(f"{'ok  ' if rec['ok'] else 'FAIL'} {tag} {detail}", flush=True)
        result["check"] = recs
    if "time" not in skip and cuda and P == 1:
        result["time"] = {}
        for backend in ("auto", "flash"):
            result["time"][backend] = cost(args.tokens, args.reps, backend)
            print(f"\n== fwd+bwd, B=1 T={args.tokens} H={H} Hkv={HKV} d=128 bf16, "
                  f"attention_backend={backend} ==")
            for row in result["time"][backend]:
                print(f"  {row['layout']:36s} {row['ms']:9.3f} ms  x{row['x']:.3f}")
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
