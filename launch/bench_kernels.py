"""GPU check and benchmark of the Triton kernels (``lsp.kernels``).

1. Correctness: every family x gate kind x dtype (bf16, fp16, fp32) against the float64 per-token
   oracle (outputs, final state, every input gradient incl. the initial state, with a random
   cotangent on the final state), with the CUDA caching allocator poisoned with NaN before each
   kernel call so that an element a kernel fails to write shows up; plus wide shapes (K != V,
   V = 256 as in the sequence-parallel augmented call, K = 256), forced sequence segments, and
   gates of 0 / -1000. Pass: rel err <= 1e-2 (bf16, fp16), <= 1e-4 (fp32), everything finite.
   K = 256 runs the key-blocked WY backward (``wy_bwd_blocked_kernel``) with a scalar and a
   per-channel gate. The cases run in worker processes, the fp32 ones at K >= 128 first (their
   ieee-dot kernels take ~60 s to compile); with two GPUs the workers use the second GPU while
   the timing runs on the first.
2. Timing: fwd+bwd at B=1, H=16, K=V=128, bf16, T in {8K, 32K, 64K, 128K} for each family next to
   its fla 0.6.0 counterpart and torch SDPA flash attention (causal), same run, CUDA events,
   median of several repeats; peak memory of the fwd+bwd above the inputs (``--ops``: a
   subset of the ops, where fla's cold autotuning of all six would not fit a call). fla 0.6.0
   refuses its gated backward on Hopper with triton < 3.7.1 (fla #640); for the baseline timing the
   script sets ``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`` (fla's gradients are not
   checked here).
3. Other shapes (``--shapes``): Gated DeltaNet at H = 8, T = 512K (one GPU's share of the
   1M-token run) and B = 8 x 64K (the same tokens), lsp next to fla.
4. Optional: segment sweep (Gated DeltaNet fwd+bwd at T = 64K for several in-GPU segment
   counts) and a per-kernel profile at T = 64K, lsp next to fla, of Gated DeltaNet or of the
   ops named by ``--profile-ops`` (``all``: every family and gate) (``--skip sweep,profile``
   leaves them out).

The tolerances are not loosened anywhere: on the CPU, Triton's interpreter patched to round like
the GPU (bf16 casts round-to-nearest-even, tf32 operand rounding) gives the K = 64 bf16 cases
errors of ~3e-3 (KDA-like ``dg`` 2.8e-3), fp16 ~4e-4. A GPU error far above that is a kernel bug,
not bf16 rounding; ``launch/kernel_twin_check.py`` finds the kernel (each launch against its
float32 / ieee twin on the same inputs).

Prints tables and writes JSON::

    python -m lsp.launch.bench_kernels --out bench.json [--commit SHA] [--seqlens 8192,32768]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

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

NAMES = {
    ("linear_attention", "none"): "linear attention",
    ("linear_attention", "head"): "decayed LA (simple GLA)",
    ("linear_attention", "key"): "GLA",
    ("delta_rule", "none"): "DeltaNet",
    ("delta_rule", "head"): "Gated DeltaNet",
    ("delta_rule", "key"): "KDA-like",
}
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"  # a CPU dry run of the script's logic (interpreter) sets "cpu"


# ----------------------------------------------------------------------------------- helpers
def log(*a):
    print(*a, flush=True)


def poison():
    """Fill the caching allocator's free memory with NaN, so unwritten outputs read as NaN."""
    if DEVICE != "cuda":
        return
    big = torch.empty(256 * 2**20, dtype=torch.float32, device=DEVICE).fill_(float("nan"))
    small = [torch.empty(2**17, dtype=torch.float32, device=DEVICE).fill_(float("nan"))
             for _ in range(128)]
    del big, small


def inputs(family, gate, B, T, H, K, V, dtype, seed=0, gate_value=None, state=True):
    """Random op inputs on ``DEVICE``: q, k, v in ``dtype``; gates, beta and the state stay
    float32, as models keep them."""
    return make_inputs(family, gate, B, T, H, K, V, dtype, with_state=state, seed=seed,
                       gate_value=gate_value, device=DEVICE, gates_dtype=torch.float32)


# ------------------------------------------------------------------------------- correctness
def correctness_cases():
    cases = []
    for family in FAMILIES:
        for gate in GATES:
            for dts in ("bf16", "fp16", "fp32"):
                cases.append(dict(family=family, gate=gate, dtype=dts, B=2, T=333, H=2, K=64,
                                  V=128, segs=3, oracle="naive"))
    for family in FAMILIES:
        for gate in ("head", "key"):
            for gv in (0.0, -1000.0):
                cases.append(dict(family=family, gate=gate, dtype="fp32", B=1, T=200, H=2, K=64,
                                  V=64, segs=2, oracle="naive", gate_value=gv))
    wide = [("delta_rule", "head", "bf16", 128, 256), ("delta_rule", "key", "bf16", 128, 256),
            ("linear_attention", "key", "bf16", 128, 256), ("delta_rule", "head", "bf16", 256, 64),
            ("linear_attention", "head", "bf16", 256, 128), ("delta_rule", "none", "fp32", 32, 32),
            ("delta_rule", "head", "fp32", 128, 128), ("linear_attention", "none", "bf16", 128, 128)]
    for family, gate, dts, K, V in wide:
        cases.append(dict(family=family, gate=gate, dtype=dts, B=1, T=1500, H=2, K=K, V=V,
                          segs=None, oracle="chunk64"))
    cases.append(dict(family="delta_rule", gate="key", dtype="bf16", B=1, T=1500, H=2, K=256,
                      V=128, segs=None, oracle="chunk64"))
    cases.append(dict(family="delta_rule", gate="head", dtype="bf16", B=1, T=8192, H=4, K=128,
                      V=128, segs=None, oracle="chunk64"))
    # longest first: the fp32 kernels (ieee dots, no tensor cores) take ~60 s to compile at
    # K = 128 on the H100 host and the K = 256 (key-blocked WY backward) ones ~20 s, so they
    # start before the many short cases instead of being left for the end of the time budget
    return sorted(cases, key=lambda c: (-(c["K"] >= 128 and c["dtype"] == "fp32"), -c["K"]))


def _chunk_ref(family, q, k, v, *rest, initial_state=None, output_final_state=False):
    """The float64 chunkwise torch path (exact to float64 rounding; tests check it against the
    per-token oracle), for the longer cases where the per-token loop is slow."""
    from lsp.ops.common.chunk import chunk_recurrence

    beta = rest[0] if family == "delta_rule" else None
    return chunk_recurrence(q, k, v, rest[-1], beta, q.shape[-1] ** -0.5, initial_state,
                            output_final_state)


def run_case(c):
    from lsp import kernels

    dtype = DT[c["dtype"]]
    a = inputs(c["family"], c["gate"], c["B"], c["T"], c["H"], c["K"], c["V"], dtype,
               seed=c["T"] + c["K"], gate_value=c.get("gate_value"))
    rec = dict(c)
    try:
        poison()
        o, S, grads = outputs_and_grads(getattr(kernels, c["family"]), a, num_segments=c["segs"])
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        ref = upcast(a)
        if c["oracle"] == "naive":
            o_r, S_r, g_r = outputs_and_grads(naive_for(c["family"]), ref)
        else:
            def rfn(*args, **kw):
                return _chunk_ref(c["family"], *args, **kw)
            o_r, S_r, g_r = outputs_and_grads(rfn, ref)
        finite = bool(torch.isfinite(o).all() and torch.isfinite(S).all()
                      and all(torch.isfinite(g).all() for g in grads.values()))
        errs = {"o": rel_err(o, o_r), "S": rel_err(S, S_r)}
        errs.update({f"d{n}": rel_err(grads[n], g_r[n]) for n in grads})
        tol = TOL[dtype] if c.get("gate_value") != -1000.0 else 1e-3
        rec.update(errs=errs, finite=finite, tol=tol, worst=max(errs.values()),
                   ok=finite and all(e <= tol for e in errs.values()))
    except Exception as exc:  # keep going; the report says what broke
        rec.update(ok=False, error=repr(exc)[:500], trace=traceback.format_exc()[-3000:])
    return rec


def case_line(rec):
    tag = (f"{NAMES[(rec['family'], rec['gate'])]:24s} {rec['dtype']:5s} T={rec['T']:5d} "
           f"K={rec['K']:3d} V={rec['V']:3d} P={rec['segs']}")
    if "gate_value" in rec:
        tag += f" g={rec['gate_value']}"
    if "error" in rec:
        return f"FAIL {tag}: {rec['error']}"
    flag = "ok  " if rec["ok"] else "FAIL"
    return (f"{flag} {tag} worst={rec['worst']:.2e} (tol {rec['tol']:.0e}) finite={rec['finite']} "
            + " ".join(f"{k}={v:.1e}" for k, v in rec["errs"].items()))


def _worker_init(n_gpus=1):
    # fla: compile every autotune config here (shared Triton cache) but keep no tuning result,
    # so the main process tunes on a quiet GPU
    os.environ["FLA_CACHE_RESULTS"] = "0"
    if n_gpus >= 2:
        # with two GPUs the workers (correctness cases, warm-ups) use the second one and the
        # main process times on the first, at the same time
        os.environ["CUDA_VISIBLE_DEVICES"] = "1"


def pool_task(task):
    """Phase A, in a worker process: a correctness case, or a warm-up that compiles kernels."""
    kind = task["kind"]
    t0 = time.time()
    try:
        if kind == "case":
            rec = run_case(task["case"])
        else:
            family, gate = task["family"], task["gate"]
            a = bench_inputs(family, gate, task["T"])
            if kind == "warm_fla":
                _allow_fla_gated_bwd()
                fn = fla_fn(family, gate)
            else:
                from lsp import kernels
                fn = ours_fn(kernels, family)
            fwd_bwd(fn, a)()
            torch.cuda.synchronize()
            rec = dict(kind=kind, family=family, gate=gate, ok=True)
    except Exception as exc:
        rec = dict(kind=kind, family=task.get("family"), gate=task.get("gate"), ok=False,
                   error=repr(exc)[:500], trace=traceback.format_exc()[-3000:])
    rec["seconds"] = time.time() - t0
    return rec


def _allow_fla_gated_bwd():
    """fla 0.6.0 refuses its gated backward on Hopper with triton < 3.7.1 (fla #640); for the
    baseline timing only, let it run (its gradients are not checked here)."""
    import fla.ops.common.chunk_o as fla_chunk_o
    was = bool(fla_chunk_o.TRITON_ABOVE_3_7_1)
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True
    return was


# ------------------------------------------------------------------------------------ timing
def timed(run, reps, warmup=1):
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts), ts


def kernel_times(run) -> list[tuple[str, float, int]]:
    """``(kernel, GPU ms, calls)`` of one ``run()`` under the torch profiler, slowest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append((ev.key, t / 1000.0, ev.count))
    return sorted(rows, key=lambda r: -r[1])


def peak_mem(run):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_inputs(family, gate, T, B=1, H=16, K=128, V=128, seed=0):
    a = inputs(family, gate, B, T, H, K, V, torch.bfloat16, seed=seed, state=False)
    if "beta" in a:
        a["beta"] = a["beta"].detach().to(torch.bfloat16).requires_grad_()
    return a


def fwd_bwd(fn, a):
    """A closure running forward + backward (w.r.t. every input) with a fixed cotangent."""
    leaves = list(a.values())
    o = fn(a)
    do = torch.randn_like(o)
    del o

    def run():
        o = fn(a)
        torch.autograd.grad(o, leaves, do)
    return run


def ours_fn(kernels, family, segs=None):
    f = getattr(kernels, family)

    def fn(a):
        return call(f, a, num_segments=segs)[0]
    return fn


def fla_fn(family, gate):
    if (family, gate) == ("linear_attention", "none"):
        from fla.ops.linear_attn import chunk_linear_attn
        return lambda a: chunk_linear_attn(a["q"], a["k"], a["v"], normalize=False)[0]
    if (family, gate) == ("linear_attention", "head"):
        from fla.ops.simple_gla import chunk_simple_gla
        return lambda a: chunk_simple_gla(a["q"], a["k"], a["v"], g=a["g"])[0]
    if (family, gate) == ("linear_attention", "key"):
        from fla.ops.gla import chunk_gla
        return lambda a: chunk_gla(a["q"], a["k"], a["v"], g=a["g"])[0]
    if (family, gate) == ("delta_rule", "none"):
        from fla.ops.delta_rule import chunk_delta_rule
        return lambda a: chunk_delta_rule(a["q"], a["k"], a["v"], a["beta"])[0]
    if (family, gate) == ("delta_rule", "head"):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return lambda a: chunk_gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"])[0]
    from fla.ops.kda import chunk_kda
    return lambda a: chunk_kda(a["q"], a["k"], a["v"], a["g"], a["beta"])[0]


def sdpa_fn():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(a):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(a["q"].transpose(1, 2), a["k"].transpose(1, 2),
                                               a["v"].transpose(1, 2), is_causal=True)
        return o.transpose(1, 2)
    return fn


def measure(fn, a, reps):
    run = fwd_bwd(fn, a)
    ms, ts = timed(run, reps)
    mem = peak_mem(run)
    return dict(ms=ms, all_ms=ts, peak_gib=mem)


def cpu_smoke(out: str) -> bool:
    """Every family x gate kind at a tiny shape under the interpreter (fp32), vs the oracle."""
    global DEVICE
    os.environ["TRITON_INTERPRET"] = "1"  # before lsp.kernels decorates its kernels
    DEVICE = "cpu"
    cases = [dict(family=f, gate=g, dtype="fp32", B=1, T=40, H=2, K=16, V=32, segs=2,
                  oracle="naive") for f in FAMILIES for g in GATES]
    recs = [run_case(c) for c in cases]
    for r in recs:
        log(case_line(r))
    ok = all(r["ok"] for r in recs)
    log(f"correctness: {sum(r['ok'] for r in recs)}/{len(recs)} passed")
    with open(out, "w") as f:
        json.dump(dict(info=dict(device="cpu (Triton interpreter)", torch=torch.__version__,
                                 command=" ".join(sys.argv)), correctness=recs), f, indent=1)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--commit", default=os.environ.get("LSP_COMMIT", "unknown"))
    ap.add_argument("--seqlens", default="8192,32768,65536,131072")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", default="delta_rule:head:1:65536:16,delta_rule:head:1:524288:8,"
                    "delta_rule:head:8:65536:8",
                    help="extra rows family:gate:B:T:H timed for lsp and fla (section 'shapes')")
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: correct,time,shapes,sweep,profile,fla")
    ap.add_argument("--sweep", default="1,2,4,8,16,32,64", help="segment counts for the sweep")
    ap.add_argument("--ops", default="all",
                    help="family:gate pairs timed (section 'time'; SDPA always), or 'all'")
    ap.add_argument("--profile-ops", default="delta_rule:head",
                    help="family:gate pairs profiled at T = 64K (section 'profile'), or 'all'")
    ap.add_argument("--workers", type=int, default=min(6, max(1, (os.cpu_count() or 2) - 4)),
                    help="correctness worker processes sharing one GPU (more ran out of GPU "
                         "memory at fp32 kernel launches on an H100)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole script")
    ap.add_argument("--phase-a", type=float, default=None,
                    help="seconds for the parallel phase (default: half the budget)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU small form (CI): tiny correctness cases of every family and gate "
                         "under Triton's interpreter; no timing")
    args = ap.parse_args()
    if args.cpu_smoke:
        sys.exit(0 if cpu_smoke(args.out) else 1)
    t_start = time.time()
    end = t_start + args.budget
    skip = set(filter(None, args.skip.split(",")))
    profiled = op_pairs(args.profile_ops)  # a typo fails here, not after the timing
    timed = op_pairs(args.ops, "--ops")

    import triton

    from lsp import kernels
    from lsp.kernels.common.utils import choose_segments
    from lsp.launch import bench_kernels as bk  # workers pickle functions of the named module

    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(), commit=args.commit,
                sms=torch.cuda.get_device_properties(0).multi_processor_count,
                command=" ".join(sys.argv))
    if "fla" not in skip:
        try:
            import fla
            info["fla"] = fla.__version__
            info["fla_TRITON_ABOVE_3_7_1_was"] = _allow_fla_gated_bwd()
        except Exception as exc:
            info["fla_error"] = repr(exc)
            skip.add("fla")
    log("env:", json.dumps(info))
    result = dict(info=info)

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    # A. in parallel worker processes: correctness cases, and warm-ups that compile every kernel
    #    of the timing section (lsp's and all of fla's autotune configs) into the Triton cache.
    #    One GPU: all of it first, then the timing. Two GPUs: the workers use the second GPU while
    #    the main process times on the first (lsp's rows once lsp's warm-ups are in, fla's once
    #    fla's are), and the correctness results are collected at the end.
    n_gpus = torch.cuda.device_count()
    overlap = n_gpus >= 2
    info["workers_gpu"] = 1 if overlap else 0
    tasks = []
    if "correct" not in skip:
        cases = correctness_cases()
        # the slowest compiles (fp32 at K >= 128) go to the front of the queue
        tasks += [dict(kind="case", case=c) for c in cases if c["dtype"] == "fp32" and c["K"] >= 128]
    if "fla" not in skip and "time" not in skip:
        tasks += [dict(kind="warm_fla", family=f, gate=g, T=8192) for f, g in timed]
    if "time" not in skip:
        tasks += [dict(kind="warm_lsp", family=f, gate=g, T=4096) for f, g in timed]
    if "correct" not in skip:
        tasks += [dict(kind="case", case=c) for c in cases
                  if not (c["dtype"] == "fp32" and c["K"] >= 128)]
    # phase A gets the whole budget when nothing is timed after it (or when the timing runs
    # beside it on the other GPU); on one GPU with timing to follow it gets half
    alone = overlap or "time" in skip
    phase_a_end = t_start + (args.phase_a if args.phase_a else
                             (args.budget - 10 if alone else 0.5 * args.budget))
    pending, recs = [], []
    pool = None
    if tasks:
        import multiprocessing as mp
        log(f"\n== phase A: {len(tasks)} tasks on {args.workers} worker processes "
            f"(GPU {info['workers_gpu']}) ==")
        ctx = mp.get_context("spawn")
        pool = ctx.Pool(args.workers, initializer=bk._worker_init, initargs=(n_gpus,))
        pending = [(t, pool.apply_async(bk.pool_task, (t,))) for t in tasks]

    def collect(kinds, until):
        """Wait (until ``until``) for the pending tasks of these kinds; returns how many are
        still missing."""
        missing = 0
        for t, h in list(pending):
            if t["kind"] not in kinds:
                continue
            try:
                recs.append(h.get(timeout=max(0.1, until - time.time())))
                pending.remove((t, h))
            except Exception:  # multiprocessing.TimeoutError
                missing += 1
        return missing

    def drain():
        """Log and save the correctness results finished so far (without waiting), so that a run
        cut short by its time limit still reports every case that completed."""
        for t, h in list(pending):
            if t["kind"] == "case" and h.ready():
                r = h.get()
                recs.append(r)
                pending.remove((t, h))
                log(case_line(r))
                result["correctness"] = [x for x in recs if "oracle" in x]
                save()

    if not overlap:
        left = collect({"case", "warm_lsp", "warm_fla"}, phase_a_end)
        if left:
            log(f"phase A: time budget reached with {left} tasks unfinished")
            if "time" not in skip:
                # nothing else may use the GPU while it is timed: the 05808ee run timed Gated
                # DeltaNet at 23.7-35.2 ms (11.5 alone) beside fla's unfinished warm-ups. A
                # kernel not warmed here compiles (or autotunes) in its row's warm-up call.
                info["stopped_before_timing"] = sorted({t["kind"] for t, _ in pending})
                log("phase A: stopping the workers before the timing")
                pool.terminate()

    # B. timing table (lsp and SDPA, then fla)
    table = {}
    if "time" not in skip:
        seqlens = [int(x) for x in args.seqlens.split(",")]
        result["timing"] = []

        def flush_table():
            result["timing"] = [table[k] for k in sorted(table, key=lambda k: (k[0], k[1]))]
            save()

        def time_pass(who):
            log(f"\n== fwd+bwd time ({who}), B=1 H=16 K=V=128 bf16 ==")
            for T in seqlens:
                for i, (family, gate) in enumerate([(f, g) for f in FAMILIES for g in GATES]
                                                   + [("sdpa", None)]):
                    if family != "sdpa" and (family, gate) not in timed:
                        continue
                    drain()
                    # fla's first call of a shape autotunes (tens of seconds at 128K)
                    if time.time() > end - (8 if who == "lsp" else 40):
                        log("timing: time budget reached")
                        return
                    if family == "sdpa":
                        if who != "lsp":
                            continue
                        a = bench_inputs("linear_attention", "none", T)
                        try:
                            r = measure(sdpa_fn(), a, 3 if T > 32768 else 5)
                        except Exception as exc:
                            r = dict(error=repr(exc)[:300])
                        table[(T, 99)] = dict(T=T, op="SDPA flash (causal)", sdpa=r)
                        log(row_line(table[(T, 99)]))
                    else:
                        row = table.setdefault((T, i), dict(T=T, op=NAMES[(family, gate)]))
                        a = bench_inputs(family, gate, T)
                        reps = args.reps if T <= 65536 else max(3, args.reps // 2)
                        fn = ours_fn(kernels, family) if who == "lsp" else fla_fn(family, gate)
                        try:
                            row[who] = measure(fn, a, reps)
                        except Exception as exc:
                            row[who] = dict(error=repr(exc)[:300])
                        r = row[who]
                        log(f"{T:7d} {row['op']:24s} {who}: {r.get('ms', float('nan')):9.3f} ms "
                            f"{r.get('peak_gib', float('nan')):6.2f} GiB"
                            + (f" err {r['error']}" if "error" in r else ""))
                    del a
                    torch.cuda.empty_cache()
                flush_table()

        if overlap:
            collect({"warm_lsp"}, phase_a_end)
        time_pass("lsp")
        if "fla" not in skip:
            if overlap:
                collect({"warm_fla"}, phase_a_end - 40)
            time_pass("fla")
        flush_table()

    # C. correctness results (and the warm-ups' log)
    if pool is not None:
        left = collect({"case", "warm_lsp", "warm_fla"}, phase_a_end)
        if left:
            log(f"phase A: time budget reached with {left} tasks unfinished: "
                + ", ".join(case_line(dict(t["case"], ok=False, error="unfinished"))
                            if t["kind"] == "case" else t["kind"] for t, _ in pending))
        pool.terminate()
        correct = [r for r in recs if "oracle" in r]
        warm = [r for r in recs if "oracle" not in r]
        for r in warm:
            status = "ok" if r["ok"] else f"FAIL {r.get('error')}\n{r.get('trace', '')}"
            log(f"  {r['kind']:9s} {r.get('family', '')}/{r.get('gate', '')}: {r['seconds']:.0f} s {status}")
        if "correct" not in skip:
            log("\n== correctness vs float64 (allocator poisoned with NaN first) ==")
            for r in correct:
                log(case_line(r))
                if "trace" in r:
                    log(r["trace"])
            log(f"correctness: {sum(r['ok'] for r in correct)}/{len(cases)} passed "
                f"({len(cases) - len(correct)} unfinished)")
            result["correctness_unfinished"] = [t["case"] for t, _ in pending
                                                if t["kind"] == "case"]
        result["correctness"] = correct
        result["warmup"] = warm
        log(f"phase A took {time.time() - t_start:.0f} s")
        save()

    # D'. rows of other shapes (the 1M-token run's share of one GPU: H=8, T=512K; the same tokens
    #     as 8 sequences), lsp then fla on each, one after the other in this process
    if "shapes" not in skip and args.shapes:
        log("\n== fwd+bwd time at other shapes (K=V=128 bf16): lsp / fla ==")
        result["shapes"] = []
        for spec in args.shapes.split(","):
            family, gate, B, T, H = spec.split(":")
            B, T, H = int(B), int(T), int(H)
            row = dict(op=NAMES[(family, gate)], B=B, T=T, H=H)
            a = bench_inputs(family, gate, T, B=B, H=H)
            reps = args.reps if B * T * H <= 65536 * 16 else max(3, args.reps // 2)
            for who in ("lsp", "fla"):
                if who == "fla" and "fla" in skip:
                    continue
                if time.time() > end - 40:
                    row[who] = dict(error="time budget reached")
                    continue
                fn = ours_fn(kernels, family) if who == "lsp" else fla_fn(family, gate)
                try:
                    row[who] = measure(fn, a, reps)
                except Exception as exc:
                    row[who] = dict(error=repr(exc)[:300])
            result["shapes"].append(row)
            ms = [row.get(w, {}).get("ms", float("nan")) for w in ("lsp", "fla")]
            log(f"  {row['op']:16s} B={B} T={T:7d} H={H:2d}: lsp {ms[0]:8.3f} ms  fla "
                f"{ms[1]:8.3f} ms  lsp/fla {ms[0] / ms[1]:.2f}")
            del a
            torch.cuda.empty_cache()
            save()

    # D. segment sweep (Gated DeltaNet, T=64K)
    if "sweep" not in skip and time.time() < end - 40:
        log("\n== segment sweep: Gated DeltaNet fwd+bwd, B=1 H=16 K=V=128 T=65536 bf16 ==")
        a = bench_inputs("delta_rule", "head", 65536)
        sweep = {}
        for P in [int(x) for x in args.sweep.split(",")]:
            try:
                r = measure(ours_fn(kernels, "delta_rule", P), a, 5)
                sweep[P] = r
                log(f"  P={P:3d}: {r['ms']:.3f} ms  peak {r['peak_gib']:.2f} GiB")
            except Exception as exc:
                sweep[P] = dict(error=repr(exc)[:300])
                log(f"  P={P}: ERROR {exc!r}")
        info["rule_segments_64k"] = choose_segments(1, 16, 2, 1024, torch.device("cuda"))[0]
        log(f"  (the rule picks P={info['rule_segments_64k']})")
        result["segment_sweep"] = {str(k): v for k, v in sweep.items()}
        del a
        save()

    # E. per-kernel profile of one fwd+bwd at T=64K (Gated DeltaNet unless --profile-ops), lsp
    #    and fla
    if "profile" not in skip:
        result["profile_64k"] = {}
        for family, gate in profiled:
            if time.time() > end - 35:
                log(f"profile {family}:{gate}: time budget reached")
                break
            a = bench_inputs(family, gate, 65536)
            prof_out = {}
            who = [("lsp", ours_fn(kernels, family))]
            if "fla" not in skip:
                who.append(("fla", fla_fn(family, gate)))
            for name, fn in who:
                try:
                    run = fwd_bwd(fn, a)
                    run()
                    torch.cuda.synchronize()
                    rows = kernel_times(run)
                    prof_out[name] = rows[:30]
                    log(f"\n-- profile {NAMES[(family, gate)]} {name}: GPU ms, calls, kernel --")
                    for key, t, n in rows[:16]:
                        log(f"  {t:8.3f}  {n:3d}  {key[:100]}")
                except Exception as exc:
                    prof_out[name] = repr(exc)
                    log(f"profile {family}:{gate} {name}: ERROR {exc!r}")
            result["profile_64k"][f"{family}:{gate}"] = prof_out
            del a
            torch.cuda.empty_cache()
            save()

    if table:
        log(f"\n== summary: {info['device']}, commit {args.commit}, triton {info['triton']}, "
            f"fla {info.get('fla')} ==")
        log(f"{'T':>7} {'op':24s} {'lsp ms':>9} {'fla ms':>9} {'lsp/fla':>7} {'lsp GiB':>8} "
            f"{'fla GiB':>8}")
        for row in result["timing"]:
            log(row_line(row, short=True))
    if result.get("correctness"):
        res = result["correctness"]
        log(f"correctness: {sum(r['ok'] for r in res)}/{len(res) + len(result.get('correctness_unfinished', []))} passed")
    result["elapsed_s"] = time.time() - t_start
    save()


def op_pairs(spec: str, flag: str = "--profile-ops") -> list[tuple[str, str]]:
    """``--profile-ops`` (or ``--ops``): ``all`` or a comma list of ``family:gate`` pairs,
    checked."""
    if spec == "all":
        return [(f, g) for f in FAMILIES for g in GATES]
    pairs = [tuple(x.split(":")) for x in spec.split(",") if x]
    for pair in pairs:
        if pair not in NAMES:
            raise SystemExit(f"{flag}: unknown pair {':'.join(pair)!r}; use 'all' or "
                             f"family:gate with family in {FAMILIES} and gate in {GATES}")
    return pairs


def row_line(row, short=False):
    nan = float("nan")
    if "sdpa" in row:
        r = row["sdpa"]
        return (f"{row['T']:7d} {row['op']:24s} {r.get('ms', nan):9.3f} {'':9s} {'':7s} "
                f"{r.get('peak_gib', nan):8.2f}" + (f" err {r['error']}" if "error" in r else ""))
    lm, fm = row.get("lsp", {}), row.get("fla", {})
    lms, fms = lm.get("ms", nan), fm.get("ms", nan)
    line = (f"{row['T']:7d} {row['op']:24s} {lms:9.3f} {fms:9.3f} {lms / fms:7.2f} "
            f"{lm.get('peak_gib', nan):8.2f} {fm.get('peak_gib', nan):8.2f}")
    if not short:
        line += "".join(f" {w}-err {r['error']}" for w, r in (("lsp", lm), ("fla", fm))
                        if "error" in r)
    return line


if __name__ == "__main__":
    sys.exit(main())
