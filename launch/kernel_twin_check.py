"""Per-kernel GPU check: each Triton kernel launch of one fwd+bwd against its float32 "twin".

A kernel compiled for bf16/fp16 inputs (tf32 / 16-bit tensor-core dots) is rerun on the same
inputs upcast to float32 with ``input_precision="ieee"`` (no tensor cores: the path the fp32
correctness cases exercise, which agree with the float64 oracle to ~1e-6). The relative difference
of every output is then only the input-dtype rounding of the kernel's own intermediates
(~5e-4 fp16, ~4e-3 bf16); a kernel far above that is miscompiled. ``--warps W`` additionally
reruns every kernel at ``num_warps=W`` (results of that rerun replace the default ones, so the
end-to-end errors printed at the end are those of the variant). The twin and the variant run at
``num_stages=1``; the checked launch runs as the library launches it (pipelined where it is).

    python -m lsp.launch.kernel_twin_check --family delta_rule --gate vector --dtype fp16 \
        [--warps 2] [--out twin.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _is_float16ish(t):
    return isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="delta_rule")
    ap.add_argument("--gate", default="key")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--T", type=int, default=333)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--warps", type=int, default=0, help="rerun every kernel at this num_warps")
    ap.add_argument("--only", default="", help="comma list of kernel names the --warps rerun uses")
    ap.add_argument("--kernels", default="intra_fwd_kernel,grad_kernel,pairwise_bwd_kernel,"
                    "wy_bwd_kernel,wy_bwd_blocked_kernel",
                    help="comma list of the kernels to check (others run as usual); 'all' for all")
    ap.add_argument("--out", default="")
    ap.add_argument("--cpu", action="store_true", help="dry run under Triton's interpreter")
    args = ap.parse_args()
    if args.cpu:
        import os
        os.environ["TRITON_INTERPRET"] = "1"

    from lsp.kernels.common import chunk as kchunk
    from lsp.kernels.common import pairwise as kpair
    from lsp.kernels.common import utils as kutils
    from lsp.kernels.delta_net import stages as kstages
    from lsp.launch import bench_kernels as bk
    from lsp.testing import rel_err

    if args.cpu:
        bk.DEVICE = "cpu"
    only = set(filter(None, args.only.split(",")))
    checked = None if args.kernels == "all" else set(filter(None, args.kernels.split(",")))
    report = []
    orig_launch = kutils.launch

    def hooked(kernel, grid, *a, num_warps, num_stages=2, **cx):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)
        if checked is not None and name not in checked:
            return orig_launch(kernel, grid, *a, num_warps=num_warps, num_stages=num_stages, **cx)
        tensors = {i: x for i, x in enumerate(a) if isinstance(x, torch.Tensor)}
        snap, seen = {}, {}
        for i, x in tensors.items():
            if id(x) not in seen:
                seen[id(x)] = x.clone()
            snap[i] = seen[id(x)]
        orig_launch(kernel, grid, *a, num_warps=num_warps, num_stages=num_stages, **cx)
        _sync()
        changed = [i for i, x in tensors.items()
                   if x.is_floating_point() and not torch.equal(x, snap[i])
                   and (i == min(j for j, y in tensors.items() if y is x))]

        def rerun(to_f32, warps, ip):
            m = {}
            args2 = []
            for i, x in enumerate(a):
                if i in tensors:
                    key = id(tensors[i])
                    if key not in m:
                        s = snap[i]
                        m[key] = s.float().clone() if (to_f32 and _is_float16ish(s)) else s.clone()
                    args2.append(m[key])
                else:
                    args2.append(x)
            cx2 = dict(cx)
            if ip is not None and "IP" in cx2:
                cx2["IP"] = ip
            kernel[grid](*args2, num_warps=warps, num_stages=1, **cx2)
            _sync()
            return args2

        twin = rerun(True, num_warps, "ieee")
        rec = dict(kernel=name, warps=num_warps, consts={k: v for k, v in cx.items()
                                                            if k in ("GATE", "MODE", "BK", "BV",
                                                                     "BKW", "STRICT", "SAME", "IP")},
                   outputs={})
        for i in changed:
            rec["outputs"][str(i)] = dict(real_vs_twin=rel_err(tensors[i], twin[i]),
                                          dtype=str(tensors[i].dtype))
        if args.warps and (not only or name in only) and args.warps != num_warps:
            var = rerun(False, args.warps, None)
            for i in changed:
                rec["outputs"][str(i)]["var_vs_twin"] = rel_err(var[i], twin[i])
                tensors[i].copy_(var[i])  # the variant's result goes on
        report.append(rec)
        line = " ".join(f"arg{i}:{v['real_vs_twin']:.1e}"
                        + (f"/w{args.warps}:{v['var_vs_twin']:.1e}" if "var_vs_twin" in v else "")
                        for i, v in rec["outputs"].items())
        print(f"  {name:24s} w={num_warps} {rec['consts']} {line}", flush=True)

    kchunk.launch = hooked
    kpair.launch = hooked
    kstages.launch = hooked  # the delta rule's WY stages
    t0 = time.time()
    case = dict(family=args.family, gate=args.gate, dtype=args.dtype, B=2, T=args.T, H=2,
                K=args.K, V=args.V, segs=3, oracle="naive" if args.T <= 400 else "chunk64")
    print(f"== {case} warps={args.warps} only={args.only}", flush=True)
    rec = bk.run_case(case)
    print(bk.case_line(rec), f"[{time.time() - t0:.0f} s]", flush=True)
    if "trace" in rec:
        print(rec["trace"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(case=rec, kernels=report, warps=args.warps), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
