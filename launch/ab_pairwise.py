"""A/B of the per-channel-gate pairwise kernels on one GPU (branch ``wip/pairwise-fused``).

1. Correctness: the per-channel-gate cases of ``bench_kernels``' correctness section (GLA and
   KDA-like, bf16 / fp16 / fp32, K up to 256, gates of 0 and -1000) in worker processes,
   against the float64 oracle; pass as there.
2. Timing: fwd+bwd at B=1, T=64K, H=16, K=V=128, bf16 (``bench_kernels.bench_inputs``), median
   of CUDA-event repeats, two rounds: KDA-like with its two products fused
   (``chunk.FUSE_PAIRWISE``) or separate, at 4 or 8 warps for the fused launches; GLA (one
   product) at 4 or 8 warps; a per-kernel profile of each variant's pairwise kernels.

Prints a table and writes JSON::

    python -m lsp.launch.ab_pairwise --out ab.json [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def _check(i: int, n: int, out: str) -> None:
    from lsp.launch import bench_kernels as bk

    recs = []
    for c in [c for c in bk.correctness_cases() if c["gate"] == "key"][i::n]:
        r = bk.run_case(c)
        r.pop("trace", None)
        recs.append(r)
        print(("ok  " if r["ok"] else "FAIL"), bk.case_line(r), r.get("error", ""), flush=True)
    with open(out, "w") as f:
        json.dump(recs, f)



def _profile(run) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        run()
        torch.cuda.synchronize()
    return {ev.key[:24]: round((getattr(ev, "device_time_total", 0) or 0) / 1000, 3)
            for ev in p.key_averages() if "pairwise" in ev.key}


VARIANTS = {  # name: (family, FUSE_PAIRWISE, PAIR_WARPS overrides)
    "KDA separate, 4 warps": ("delta_rule", False, {}),
    "KDA fused, 8 warps": ("delta_rule", True, {"fwd2": 8, "bwd2": 8}),
    "KDA fused, 4 warps": ("delta_rule", True, {"fwd2": 4, "bwd2": 4}),
    "GLA, 4 warps": ("linear_attention", True, {"fwd": 4, "bwd": 4}),
    "GLA, 8 warps": ("linear_attention", True, {"fwd": 8, "bwd": 8}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--check-worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.check_worker:
        _check(int(a.check_worker[0]), int(a.check_worker[1]), a.check_worker[2])
        return
    from lsp import kernels
    from lsp.kernels.common import chunk, pairwise
    from lsp.launch.bench_kernels import bench_inputs, fwd_bwd, ours_fn, timed

    t0 = time.time()
    parts = [f"{a.out}.check{i}.json" for i in range(a.workers)]
    procs = [subprocess.Popen([sys.executable, "-m", "lsp.launch.ab_pairwise", "--out", a.out,
                               "--check-worker", str(i), str(a.workers), p])
             for i, p in enumerate(parts)]
    base = dict(pairwise.PAIR_WARPS)
    runs = {}
    for fam in ("delta_rule", "linear_attention"):
        x = bench_inputs(fam, "key", 65536)
        runs[fam] = (x, fwd_bwd(ours_fn(kernels, fam), x))

    def use(name):
        fam, fuse, warps = VARIANTS[name]
        chunk.FUSE_PAIRWISE = fuse
        pairwise.PAIR_WARPS.clear()
        pairwise.PAIR_WARPS.update(base, **warps)
        return runs[fam][1]

    for name in VARIANTS:  # compile while the checks run
        use(name)()
    torch.cuda.synchronize()
    rc = [p.wait() for p in procs]
    checks = []
    for p in parts:
        try:
            with open(p) as f:
                checks += json.load(f)
        except OSError:
            pass
    rows = []
    for rnd in range(2):
        for name in VARIANTS:
            run = use(name)
            row = dict(variant=name, round=rnd, ms=round(timed(run, 9)[0], 3))
            if rnd == 0:
                row["pairwise_ms"] = _profile(run)
            rows.append(row)
            print(row, flush=True)
    chunk.FUSE_PAIRWISE = True
    pairwise.PAIR_WARPS.clear()
    pairwise.PAIR_WARPS.update(base)
    ok = sum(bool(c.get("ok")) for c in checks)
    print(f"correctness: {ok}/{len(checks)} passed (workers rc {rc})")
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, commit=a.commit,
                command=" ".join(sys.argv), elapsed_s=round(time.time() - t0))
    with open(a.out, "w") as f:
        json.dump(dict(info=info, correctness=checks, timing=rows), f, indent=1)


if __name__ == "__main__":
    main()
