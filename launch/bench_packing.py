"""GPU check and cost of packed documents (``cu_seqlens``) in the Triton kernels.

1. Correctness: every family x gate kind, bf16 and fp32, packed documents (one of a single
   token, one of exactly a chunk, one of several chunks with a ragged tail, many tiny ones)
   against the float64 per-token oracle run on each document separately: outputs, per-document
   final states and the gradient of every input, per-document initial states included, with the
   CUDA caching allocator poisoned with NaN first so that an unwritten element shows; again with
   the longest documents cut into in-GPU segments (forced). Pass: rel
   err <= 1e-2 (bf16), <= 1e-4 (fp32), everything finite. With two GPUs the cases run in worker
   processes on the second GPU while the timing runs on the first.
2. Timing: forward + backward through ``lsp.ops`` (``backend="triton"``, so the offsets' checks
   and host syncs are included) at ``T`` tokens, B = 1, H = 16, K = V = 128, bf16, Gated
   DeltaNet (``delta_rule``, head gate) and linear attention, for one document (the dense call)
   and several packings of the same tokens; CUDA events around each repeat, the median of
   ``--reps``. The cost of packing is each packing's time over the one-document time.

Prints tables and writes JSON::

    python -m lsp.launch.bench_packing --out packing.json [--commit SHA] [--tokens 65536]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import traceback

import torch

from lsp.launch.bench_kernels import fwd_bwd as bench_fwd_bwd
from lsp.launch.bench_kernels import timed
from lsp.testing import (
    FAMILIES,
    GATES,
    call,
    make_inputs,
    naive_for,
    outputs_and_grads,
    rel_err,
    upcast,
)

TOL = {"bf16": 1e-2, "fp32": 1e-4}
DT = {"bf16": torch.bfloat16, "fp32": torch.float32}
CHECK_OFFSETS = [0, 1, 65, 265, 266, 267, 269, 272, 276, 281, 287, 294, 302, 311, 321, 450]
"""One token, exactly a chunk (64), 200 tokens (three chunks and a ragged tail of 8), ten tiny
documents of 1 to 10 tokens, and one of 129 (two chunks and one token)."""


def log(*a):
    print(*a, flush=True)


def poison():
    """Fill the caching allocator's free memory with NaN, so unwritten outputs read as NaN."""
    big = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda").fill_(float("nan"))
    small = [torch.empty(2**17, dtype=torch.float32, device="cuda").fill_(float("nan"))
             for _ in range(128)]
    del big, small


# ------------------------------------------------------------------------------- correctness
def check_cases():
    cases = []
    # bf16 at the timed shape (the kernels compiled once serve both); fp32 small, with an odd
    # head count (its kernels use ieee dots, slow to compile at K = 128)
    for dts, H, K, V in (("bf16", 16, 128, 128), ("fp32", 3, 32, 32)):
        for family in FAMILIES:
            for gate in GATES:
                cases.append(dict(family=family, gate=gate, dtype=dts, H=H, K=K, V=V))
    # the longest documents cut into in-GPU segments (LSP_KERNELS_SEGMENTS=3: the 200-token
    # and the 129-token documents in two segments each): every fp32 case, and the timed ops
    for family in FAMILIES:
        for gate in GATES:
            cases.append(dict(family=family, gate=gate, dtype="fp32", H=3, K=32, V=32, segs=3))
    for family, gate in (("delta_rule", "head"), ("linear_attention", "none")):
        cases.append(dict(family=family, gate=gate, dtype="bf16", H=16, K=128, V=128, segs=3))
    return cases


def run_check(c):
    """One correctness case (in a worker process); returns its record."""
    import lsp

    rec = dict(c)
    t0 = time.time()
    try:
        dtype = DT[c["dtype"]]
        offsets = CHECK_OFFSETS
        N, T = len(offsets) - 1, offsets[-1]
        a = make_inputs(c["family"], c["gate"], 1, T, c["H"], c["K"], c["V"], dtype,
                        with_state=False, seed=11, device="cuda", gates_dtype=torch.float32)
        gen = torch.Generator(device="cuda").manual_seed(12)
        a["initial_state"] = torch.randn(N, c["H"], c["K"], c["V"], generator=gen,
                                         device="cuda").requires_grad_()
        if c.get("segs") and "g" in a:  # mild decay: a segment's start still matters at its end
            a["g"] = (a["g"].detach() * 0.02).requires_grad_()
        cu = torch.tensor(offsets, dtype=torch.int32, device="cuda")
        op = getattr(lsp.ops, c["family"])
        poison()
        if c.get("segs"):  # read by lsp.kernels.common.utils.choose_doc_segments
            os.environ["LSP_KERNELS_SEGMENTS"] = str(c["segs"])
        try:
            o, S, grads = outputs_and_grads(op, a, cu_seqlens=cu, backend="triton")
            torch.cuda.synchronize()
        finally:
            os.environ.pop("LSP_KERNELS_SEGMENTS", None)
        o_r, S_r, g_r = outputs_and_grads(naive_for(c["family"]), upcast(a), cu_seqlens=cu)
        finite = bool(torch.isfinite(o).all() and torch.isfinite(S).all()
                      and all(torch.isfinite(g).all() for g in grads.values()))
        errs = {"o": rel_err(o, o_r), "S": rel_err(S, S_r)}
        errs.update({f"d{n}": rel_err(grads[n], g_r[n]) for n in grads})
        tol = TOL[c["dtype"]]
        rec.update(errs=errs, finite=finite, tol=tol, worst=max(errs.values()),
                   ok=finite and all(e <= tol for e in errs.values()))
    except Exception as exc:  # keep going; the report says what broke
        rec.update(ok=False, error=repr(exc)[:500], trace=traceback.format_exc()[-3000:])
    rec["seconds"] = time.time() - t0
    return rec


def check_line(r):
    tag = (f"{r['family']:16s} {r['gate']:4s} {r['dtype']:4s} H={r['H']:2d} K={r['K']:3d} "
           f"V={r['V']:3d}" + (f" cut={r['segs']}" if r.get("segs") else ""))
    if "error" in r:
        return f"FAIL {tag}: {r['error']}"
    return (f"{'ok  ' if r['ok'] else 'FAIL'} {tag} worst={r['worst']:.2e} (tol {r['tol']:.0e}) "
            f"finite={r['finite']} " + " ".join(f"{k}={v:.1e}" for k, v in r["errs"].items()))


def _worker_init(n_gpus):
    if n_gpus >= 2:  # the workers use the second GPU; the main process times on the first
        os.environ["CUDA_VISIBLE_DEVICES"] = "1"


def warm(family, gate, packed):
    """Compile the timed kernels (dense or packed) into the shared Triton cache, in a worker,
    while other workers run the checks: a short fwd+bwd at the timed H, K, V and dtype (4096
    tokens: enough chunks for the dense call's segment split)."""
    t0 = time.time()
    try:
        T = 4096
        a = make_inputs(family, gate, 1, T, 16, 128, 128, torch.bfloat16, with_state=False,
                        seed=0, device="cuda", gates_dtype=torch.float32)
        cu = (torch.tensor([0, 1000, 1064, 3000, T], dtype=torch.int32, device="cuda")
              if packed else None)
        fwd_bwd(family, a, cu)()
        if not packed:  # and the one-segment build (no start state from a scan)
            os.environ["LSP_KERNELS_SEGMENTS"] = "1"
            fwd_bwd(family, a, cu)()
            os.environ.pop("LSP_KERNELS_SEGMENTS")
        torch.cuda.synchronize()
        return dict(family=family, gate=gate, packed=packed, ok=True, seconds=time.time() - t0)
    except Exception as exc:
        return dict(family=family, gate=gate, packed=packed, ok=False, error=repr(exc)[:500],
                    seconds=time.time() - t0)


# ------------------------------------------------------------------------------------ timing
def packings(T: int, seed: int = 0) -> dict:
    """Offsets of the timed layouts of ``T`` tokens (None: one document, the dense call)."""
    rnd = random.Random(seed)
    lens = []
    while sum(lens) < T:  # lengths uniform in [1, 4K): 2K on average, the last one cut at T
        lens.append(min(rnd.randrange(1, 4096), T - sum(lens)))
    out = {
        "1 doc (dense call)": None,
        "1 doc (cu_seqlens)": [0, T],
        # what one long document costs uncut (the state passes' latency without segments)
        ONE_SEGMENT: None,
        f"{T // 4096} x 4K": list(range(0, T + 1, 4096)),
        f"{len(lens)} random (mean {T // len(lens)})": [0] + [sum(lens[: i + 1])
                                                             for i in range(len(lens))],
        f"{T // 512} x 512": list(range(0, T + 1, 512)),
    }
    # one long document and many short ones (the long one is cut into segments, the rest whole)
    long_doc = T * 3 // 4
    out[f"{long_doc // 1024}K + {(T - long_doc) // 256} x 256"] = (
        [0] + list(range(long_doc, T + 1, 256)))
    return out


ONE_SEGMENT = "1 doc (dense, 1 segment)"


def fwd_bwd(family, a, cu):
    """``bench_kernels.fwd_bwd`` through ``lsp.ops`` (offsets checked, host syncs included)."""
    import lsp

    op = getattr(lsp.ops, family)
    return bench_fwd_bwd(lambda a: call(op, a, backend="triton", cu_seqlens=cu)[0], a)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--commit", default=os.environ.get("LSP_COMMIT", "unknown"))
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--workers", type=int, default=8, help="worker processes (checks, warm-ups)")
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds for the whole script; unfinished checks are reported as such")
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: check, time, warm (the warm-ups that "
                         "compile the timed kernels; a run with --skip time may still fill the "
                         "Triton cache for a later timing run)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    import triton

    t_start = time.time()
    n_gpus = torch.cuda.device_count()
    info = dict(device=torch.cuda.get_device_name(), gpus=n_gpus, torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(), commit=args.commit,
                command=" ".join(sys.argv))
    log("env:", json.dumps(info))
    result = dict(info=info)

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    end = t_start + args.budget
    timed_ops = (("delta_rule", "head"), ("linear_attention", "none"))

    def collect(hs):
        out = []
        for c, h in hs:
            try:
                out.append(h.get(timeout=max(1.0, end - time.time())))
            except Exception:  # multiprocessing.TimeoutError: past the budget
                out.append(dict(c, ok=False, error="unfinished within the time budget"))
        return out

    import multiprocessing as mp

    from lsp.launch import bench_packing as bp  # workers pickle the named module's functions
    pool = mp.get_context("spawn").Pool(args.workers, initializer=bp._worker_init,
                                        initargs=(n_gpus,))
    warm_h = []
    if "warm" not in skip:  # first in the queue: the timing waits for them
        warm_h = [(dict(family=f, gate=g, packed=p), pool.apply_async(bp.warm, (f, g, p)))
                  for f, g in timed_ops for p in (False, True)]
    handles = None
    if "check" not in skip:
        handles = [(c, pool.apply_async(bp.run_check, (c,))) for c in check_cases()]
        if n_gpus < 2:  # one GPU: the checks first, then the timing on a quiet GPU
            result["check"] = collect(handles)
    result["warmup"] = collect(warm_h)
    for w in result["warmup"]:
        log(f"warm-up {w['family']}/{w['gate']} packed={w['packed']}: "
            f"{w.get('seconds', float('nan')):.0f} s {'ok' if w['ok'] else w.get('error')}")

    if "time" not in skip:
        T = args.tokens
        rows = []
        log(f"\n== fwd+bwd through lsp.ops (backend=triton), B=1 T={T} H=16 K=V=128 bf16 ==")
        for family, gate in timed_ops:
            a = make_inputs(family, gate, 1, T, 16, 128, 128, torch.bfloat16, with_state=False,
                            seed=0, device="cuda", gates_dtype=torch.float32)
            base = None
            for name, offsets in packings(T).items():
                cu = (None if offsets is None
                      else torch.tensor(offsets, dtype=torch.int32, device="cuda"))
                if name == ONE_SEGMENT:  # read by lsp.kernels.common.utils.choose_segments
                    os.environ["LSP_KERNELS_SEGMENTS"] = "1"
                try:
                    ms, ts = timed(fwd_bwd(family, a, cu), args.reps, warmup=2)
                    base = ms if base is None else base
                    row = dict(family=family, gate=gate, layout=name,
                               docs=1 if offsets is None else len(offsets) - 1, ms=ms,
                               all_ms=ts, vs_one_doc=ms / base)
                    log(f"  {family:16s} {gate:4s} {name:28s} {row['docs']:5d} docs "
                        f"{ms:8.3f} ms  x{row['vs_one_doc']:.3f}")
                except Exception as exc:
                    row = dict(family=family, gate=gate, layout=name, error=repr(exc)[:500],
                               trace=traceback.format_exc()[-2000:])
                    log(f"  {family} {name}: ERROR {exc!r}")
                os.environ.pop("LSP_KERNELS_SEGMENTS", None)
                rows.append(row)
                result["timing"] = rows
                save()
            del a
            torch.cuda.empty_cache()

    if handles is not None and "check" not in result:
        result["check"] = collect(handles)
    pool.terminate()
    if handles is not None:
        log("\n== packed documents vs the float64 per-document oracle (allocator poisoned) ==")
        log(f"offsets {CHECK_OFFSETS}")
        for r in result["check"]:
            log(check_line(r))
            if "trace" in r:
                log(r["trace"])
        n_ok = sum(r["ok"] for r in result["check"])
        log(f"check: {n_ok}/{len(result['check'])} passed")
    result["elapsed_s"] = time.time() - t_start
    save()
    return 0 if all(r["ok"] for r in result.get("check", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
