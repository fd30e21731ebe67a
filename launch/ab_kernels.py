"""Same-process A/B of kernel variants on one GPU: module switches of ``lsp.kernels.common``.

An experiment is a set of variants, each a few switches (``chunk.GRAD_DAT_VIA_MEMORY``,
``stages.WY_DL_INPUT_DTYPE``, ``pairwise.PAIR_WARPS``, ...) and the ops it concerns:

- ``backward`` (default): the backward kernels without a per-channel gate. In the per-chunk
  gradient kernel, ``dA^T`` read back from a scratch buffer (main) or as a second product over
  the value columns; value blocks of 128 (one loop step at ``V = 128``, as fla's ``dqkwg`` on
  Hopper). In the scalar-gate WY backward, ``dL`` with operands in the input dtype (main) or
  float32. Each variant changes one thing from main; "all off" is the kernels before the A/B of
  2026-12-01 (sixth session, docs/results.md), which also measured two variants removed since.
  For DeltaNet, Gated DeltaNet, linear attention and simple GLA.
- ``pairwise``: the per-channel-gate pairwise kernels of KDA-like (two products fused or
  separate) and GLA at 4 or 8 warps (the A/B behind ``pairwise.PAIR_WARPS``, docs/results.md).

1. Correctness: for every variant but the first (the current default), the cases of
   ``bench_kernels``' correctness section for the gates of the experiment's ops, in worker
   processes that set the variant's switches, against the float64 oracle; pass as there.
2. Timing: fwd+bwd at B=1, T=64K, H=16, K=V=128, bf16 (``bench_kernels.bench_inputs``), median of
   9 CUDA-event repeats, two rounds, every op under every variant, in one process; peak memory;
   in round 1 the per-kernel times of the kernels the experiment changes (torch profiler).

Prints a table and writes JSON::

    python -m lsp.launch.ab_kernels --out ab.json [--experiment grad] [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

_SWITCHES = ("GRAD_DAT_VIA_MEMORY", "GRAD_BLOCK_V", "WY_DL_INPUT_DTYPE")


def _backward(*values) -> dict:
    return dict(zip(_SWITCHES, values))


EXPERIMENTS = {
    "backward": dict(
        # (family, gate) per op, named as bench_kernels.NAMES; the checked cases are theirs
        ops=(("delta_rule", "none"), ("delta_rule", "head"), ("linear_attention", "none"),
             ("linear_attention", "head")),
        profile=("grad_kernel", "wy_bwd"),
        variants={  # name: {chunk switch: value}; the first is main's default
            "main (dA^T via memory, dL in input dtype)": _backward(True, None, True),
            "all off": _backward(False, None, False),
            "grad: BV=128": _backward(True, 128, True),
            "wy: dL in float32": _backward(True, None, False),
        }),
    "pairwise": dict(
        ops=(("delta_rule", "key"), ("linear_attention", "key")), profile=("pairwise",),
        variants={
            "fused, 4 warps": {"FUSE_PAIRWISE": True, "PAIR_WARPS": {}},
            "separate, 4 warps": {"FUSE_PAIRWISE": False, "PAIR_WARPS": {}},
            "fused, 8 warps": {"FUSE_PAIRWISE": True,
                               "PAIR_WARPS": {"fwd": 8, "bwd": 8, "fwd2": 8, "bwd2": 8}},
        }),
}


class Switches:
    """Sets a variant's switches: ``GRAD_*`` and ``FUSE_PAIRWISE`` on ``common/chunk.py``,
    ``WY_*`` on ``delta_net/stages.py``, ``PAIR_WARPS`` on ``common/pairwise.py`` (an update of
    its defaults); ``reset()`` puts main's values back."""

    def __init__(self):
        from lsp.kernels.common import chunk, pairwise
        from lsp.kernels.delta_net import stages

        self.pairwise = pairwise
        self.home = {n: (stages if n.startswith("WY_") else chunk)
                     for n in ("FUSE_PAIRWISE",) + _SWITCHES}
        self.saved = {n: getattr(m, n) for n, m in self.home.items()}
        self.warps = dict(pairwise.PAIR_WARPS)

    def use(self, switches: dict) -> None:
        self.reset()
        for name, value in switches.items():
            if name == "PAIR_WARPS":
                self.pairwise.PAIR_WARPS.update(value)
            elif name in self.home:
                setattr(self.home[name], name, value)
            else:
                raise SystemExit(f"unknown switch {name}")

    def reset(self) -> None:
        for name, value in self.saved.items():
            setattr(self.home[name], name, value)
        self.pairwise.PAIR_WARPS.clear()
        self.pairwise.PAIR_WARPS.update(self.warps)


def cases(experiment: str) -> list[dict]:
    """``bench_kernels``' correctness cases for the experiment's gates, less the float32 ones at
    ``K >= 128`` (their ieee-precision builds take ~100 s each to compile; the float32 cases at
    ``K = 64``, extreme gates included, stay)."""
    from lsp.launch import bench_kernels as bk

    gates = {g for _, g in EXPERIMENTS[experiment]["ops"]}
    return [c for c in bk.correctness_cases() if c["gate"] in gates
            and not (c["dtype"] == "fp32" and c["K"] >= 128)]


def _check(experiment: str, variant: str, i: int, n: int, out: str) -> None:
    """Worker: every ``n``-th correctness case from ``i`` with the variant's switches set."""
    from lsp.launch import bench_kernels as bk

    exp = EXPERIMENTS[experiment]
    Switches().use(exp["variants"][variant])
    recs = []
    for c in cases(experiment)[i::n]:
        r = bk.run_case(c)
        r.pop("trace", None)
        r["variant"] = variant
        recs.append(r)
        print(("ok  " if r["ok"] else "FAIL"), variant, bk.case_line(r), r.get("error", ""),
              flush=True)
    with open(out, "w") as f:
        json.dump(recs, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--experiment", choices=tuple(EXPERIMENTS), default="backward")
    ap.add_argument("--commit", default="")
    ap.add_argument("--workers", type=int, default=2,
                    help="correctness worker processes per checked variant (on the same GPU, "
                         "while the timed builds compile)")
    ap.add_argument("--check-timeout", type=float, default=300.0,
                    help="seconds the correctness workers get before they are stopped")
    ap.add_argument("--check-worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.check_worker:
        variant, i, n, out = a.check_worker
        _check(a.experiment, variant, int(i), int(n), out)
        return
    from lsp import kernels
    from lsp.launch.bench_kernels import NAMES, bench_inputs, fwd_bwd, kernel_times, ours_fn, timed

    exp = EXPERIMENTS[a.experiment]
    names = list(exp["variants"])
    t0 = time.time()
    # the workers split each checked variant's cases between them
    jobs = [(v, i, f"{a.out}.check{k}.json") for k, (v, i) in
            enumerate((v, i) for v in names[1:] for i in range(a.workers))]
    procs = [subprocess.Popen([sys.executable, "-m", "lsp.launch.ab_kernels", "--out", a.out,
                               "--experiment", a.experiment, "--check-worker", v, str(i),
                               str(a.workers), p]) for v, i, p in jobs]
    sw = Switches()
    runs = {}
    for family, gate in exp["ops"]:
        x = bench_inputs(family, gate, 65536)
        runs[family, gate] = fwd_bwd(ours_fn(kernels, family), x)
    for v in names:  # compile every variant while the checks run
        sw.use(exp["variants"][v])
        for op in exp["ops"]:
            runs[op]()
    torch.cuda.synchronize()
    rc = []
    for p in procs:
        try:
            rc.append(p.wait(timeout=max(1.0, a.check_timeout - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            p.kill()
            rc.append("stopped")
    checks = []
    for _, _, path in jobs:
        try:
            with open(path) as f:
                checks += json.load(f)
        except OSError:
            pass
    rows = []
    for rnd in range(2):
        for v in names:
            sw.use(exp["variants"][v])
            for op in exp["ops"]:
                torch.cuda.reset_peak_memory_stats()
                row = dict(variant=v, op=NAMES[op], round=rnd, ms=round(timed(runs[op], 9)[0], 3),
                           peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))
                if rnd == 0:  # the per-kernel times of the kernels the experiment changes
                    row["kernels_ms"] = {key[:32]: round(ms, 3)
                                         for key, ms, _ in kernel_times(runs[op])
                                         if any(m in key for m in exp["profile"])}
                rows.append(row)
                print(row, flush=True)
    sw.reset()
    # the better of the two rounds, and its ratio to the first variant (main's default)
    best = {(v, op): min(r["ms"] for r in rows if r["op"] == NAMES[op] and r["variant"] == v)
            for v in names for op in exp["ops"]}
    print(f"\n{'variant':24s}" + "".join(f"{NAMES[op]:>26s}" for op in exp["ops"]))
    for v in names:
        print(f"{v:24s}" + "".join(
            f"{best[v, op]:12.3f} ms ({best[v, op] / best[names[0], op]:.3f}x)"
            for op in exp["ops"]))
    expected = len(cases(a.experiment))
    for v in names[1:]:
        mine = [c for c in checks if c["variant"] == v]
        print(f"correctness {v}: {sum(bool(c.get('ok')) for c in mine)}/{expected} passed"
              + ("" if len(mine) == expected else f" ({expected - len(mine)} not run)"))
    print(f"workers: {rc}")
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, commit=a.commit,
                experiment=a.experiment, command=" ".join(sys.argv),
                elapsed_s=round(time.time() - t0), workers_rc=rc)
    with open(a.out, "w") as f:
        json.dump(dict(info=info, correctness=checks, timing=rows), f, indent=1)


if __name__ == "__main__":
    main()
