"""``lsp-bench comm``: time the state exchange alone, per method, transition kind, size and P.

Started by torchrun (NCCL on GPUs, or gloo), by mpirun, or plainly: without a launcher it spawns
``max(--ranks)`` gloo processes on this CPU itself. Smaller rank counts are measured on
subgroups ``{0, ..., P-1}`` of the same world.

Timing (docs/design.md, Pitfalls): every rank runs the same fixed number of calls; each timed
call sits between barriers, is timed with CUDA events (GPU) or ``perf_counter`` (CPU), and the
slowest rank's time counts; we report the median over repeats and the 10th/90th percentiles.
Bytes are the method's bytes on the critical path and the bytes each rank receives
(``launch/costmodel.py``).

Writes ``comm.json`` (records, the fitted cost model, predictions to 256 ranks, the ZeCO
comparison) and PNG plots into ``--out``; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.distributed as dist

from lsp.launch import costmodel
from lsp.parallel.exchange import METHODS, all_gather_rows, default_num_blocks, make_exchange

RECORD_FIELDS = ("backend", "device", "method", "kind", "direction", "P", "B", "H", "K", "V",
                 "num_blocks", "state_bytes", "trans_bytes", "bytes_in_per_rank",
                 "critical_path_bytes", "hops", "median_ms", "p10_ms", "p90_ms", "repeats")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="lsp-bench comm", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,3,4", help="comma-separated rank counts P")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--kinds", default="scalar,diagonal,full")
    p.add_argument("--shapes", default="4x32x32,16x64x64,16x128x128",
                   help="comma-separated HxKxV state shapes (see costmodel.PRESETS)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--blocks", default="auto", help="All-Scan blocks: 'auto' or an int")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    p.add_argument("--out", default="runs/bench/comm")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def _timer(device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def _barrier(group, device):
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)


def measure_one(group, device, method, kind, B, H, K, V, blocks, warmup, repeats):
    """Forward and backward records of one configuration (called on every rank of group)."""
    P = dist.get_world_size(group)
    gen = torch.Generator(device="cpu").manual_seed(1234 + dist.get_rank(group))
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    A = {"identity": None, "scalar": rnd(B, H).sigmoid(), "diagonal": rnd(B, H, K).sigmoid(),
         "full": rnd(B, H, K, K) / K}[kind]
    Bst, G = rnd(B, H, K, V), rnd(B, H, K, V)
    s_bytes = Bst.numel() * 4
    a_bytes = 0 if A is None else A.numel() * 4
    n = (default_num_blocks(P, s_bytes, V) if blocks == "auto" else int(blocks)) \
        if method == "allscan" else 1
    ex = make_exchange(method, kind, group, False, n, s_bytes, V)
    timer = _timer(device)
    for _ in range(warmup):
        ex.forward(A, Bst, None)
        ex.backward(G, None)
    times = {"forward": [], "backward": []}
    for _ in range(repeats):
        _barrier(group, device)
        times["forward"].append(timer(lambda: ex.forward(A, Bst, None)))
        _barrier(group, device)
        times["backward"].append(timer(lambda: ex.backward(G, None)))
    out = []
    for direction, ts in times.items():
        mine = torch.tensor(ts, dtype=torch.float64, device=device)
        slowest = all_gather_rows(mine, group).max(dim=0).values.cpu().tolist()
        slowest.sort()
        hops, cp_bytes = costmodel.critical_path(method, P, s_bytes, a_bytes, n, direction)
        ag_in = (P - 1) * (s_bytes + (a_bytes if direction == "forward" else 0))
        out.append({
            "backend": dist.get_backend(group), "device": _device_name(device),
            "method": method, "kind": kind, "direction": direction, "P": P, "B": B, "H": H,
            "K": K, "V": V, "num_blocks": n, "state_bytes": s_bytes, "trans_bytes": a_bytes,
            "bytes_in_per_rank": ag_in if method == "allgather" else s_bytes,
            "critical_path_bytes": cp_bytes, "hops": hops,
            "median_ms": statistics.median(slowest),
            "p10_ms": slowest[int(0.1 * (len(slowest) - 1))],
            "p90_ms": slowest[int(0.9 * (len(slowest) - 1))], "repeats": repeats,
        })
    return out


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_benchmark(args) -> list[dict] | None:
    """Measure on an initialised world; rank 0 returns the records, others None."""
    world, rank = dist.get_world_size(), dist.get_rank()
    backend = dist.get_backend()
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    ranks = sorted({int(x) for x in args.ranks.split(",")})
    if max(ranks) > world:
        raise ValueError(f"--ranks asks for P={max(ranks)} but the world has {world} ranks; "
                         f"start {max(ranks)} processes or lower --ranks")
    shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes.split(",")]
    records = []
    for P in ranks:
        group = dist.new_group(list(range(P)))  # every world rank must create every group
        if rank < P:
            for (H, K, V) in shapes:
                for kind in args.kinds.split(","):
                    for method in args.methods.split(","):
                        records += measure_one(group, device, method, kind, args.batch, H, K, V,
                                               args.blocks, args.warmup, args.repeats)
        dist.barrier()
    return records if rank == 0 else None


def report(records: list[dict], args) -> dict:
    """Print the table, fit the cost model, write JSON and plots; return the JSON document."""
    os.makedirs(args.out, exist_ok=True)
    hdr = f"{'method':9} {'kind':8} {'dir':8} {'P':>3} {'HxKxV':>11} {'blk':>3} {'KiB in':>8} {'median ms':>10} {'p10':>8} {'p90':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in records:
        print(f"{r['method']:9} {r['kind']:8} {r['direction']:8} {r['P']:>3} "
              f"{r['H']}x{r['K']}x{r['V']:<5} {r['num_blocks']:>3} {r['bytes_in_per_rank'] / 1024:>8.1f} "
              f"{r['median_ms']:>10.4f} {r['p10_ms']:>8.4f} {r['p90_ms']:>8.4f}")
    links = costmodel.fit_records(records)
    doc = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "lsp-bench comm " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "no_plots"),
        "torch": torch.__version__,
        "records": records,
        "fit": costmodel.links_to_json(links),
        "predictions": costmodel.prediction_table(links),
        "zeco_comparison": costmodel.zeco_comparison(links),
    }
    for b, pats in links.items():
        for p, link in pats.items():
            print(f"fit {b}/{p}: alpha = {link.alpha * 1e6:.1f} us, beta = {link.beta / 1e9:.3f} GB/s")
    for row in doc["zeco_comparison"]:
        print(f"All-Scan/All-Gather at P={row['P']} ({row['backend']}, {row['preset']} {row['kind']}): "
              f"predicted {row['predicted_ratio']:.3f}, ZeCO published {row['zeco_ratio']:.3f}")
    path = os.path.join(args.out, "comm.json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    if not args.no_plots:
        for p in plot(doc, args.out):
            print(f"wrote {p}")
    return doc


def plot(doc: dict, out: str) -> list[str]:
    """Measured time vs P per method; predicted vs measured; predictions to 256 ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    color = {"allgather": "C0", "allscan": "C1", "ring": "C2"}
    recs = [r for r in doc["records"] if r["direction"] == "forward"]
    kinds = sorted({r["kind"] for r in recs})
    biggest = max(recs, key=lambda r: r["state_bytes"])
    shape = (biggest["H"], biggest["K"], biggest["V"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for method in METHODS:
            pts = sorted((r["P"], r["median_ms"]) for r in recs if r["kind"] == kind
                         and r["method"] == method and (r["H"], r["K"], r["V"]) == shape)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color[method], label=method)
        ax.set_title(f"{kind}, state {shape[0]}x{shape[1]}x{shape[2]}")
        ax.set_xlabel("ranks P")
        ax.set_ylabel("forward exchange, ms (slowest rank)")
        ax.legend()
    fig.suptitle(f"lsp-bench comm: {biggest['backend']} on {biggest['device']}")
    fig.tight_layout()
    paths.append(os.path.join(out, "comm_time_vs_P.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    links = {b: {p: costmodel.Link(**v) for p, v in pats.items()} for b, pats in doc["fit"].items()}
    if links:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for r in doc["records"]:
            pat = links.get(r["backend"], {}).get(costmodel.PATTERN[r["method"]])
            if pat is None or r["P"] < 2:
                continue
            pred = costmodel.predict(pat, r["method"], r["P"], r["state_bytes"], r["trans_bytes"],
                                     r["num_blocks"], r["direction"]) * 1e3
            a1.scatter(r["median_ms"], pred, s=10, color=color[r["method"]], label=r["method"])
        lim = [min(r["median_ms"] for r in doc["records"]), max(r["median_ms"] for r in doc["records"])]
        a1.plot(lim, lim, "k--", lw=0.8)
        a1.set_xscale("log"), a1.set_yscale("log")
        a1.minorticks_off()
        a1.set_xlabel("measured ms"), a1.set_ylabel("predicted ms")
        handles, labels = a1.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        a1.legend(uniq.values(), uniq.keys())
        a1.set_title("cost model: predicted vs measured")
        rows = [r for r in doc["predictions"] if r["preset"] == "7b"]
        for kind, style in (("diagonal", "-"), ("full", "--")):
            for method in METHODS:
                pts = [(r["P"], r[f"{method}_ms"]) for r in rows if r["kind"] == kind]
                if pts:
                    a2.plot(*zip(*pts), style, marker=".", color=color[method],
                            label=f"{method} ({kind})")
        a2.set_xscale("log", base=2), a2.set_yscale("log")
        a2.set_xlabel("ranks P"), a2.set_ylabel("predicted forward exchange, ms")
        a2.set_title("prediction, 7b preset state (32x128x128)")
        a2.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out, "comm_costmodel.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    from lsp.launch.dist_env import init_from_environment, launched

    if launched():
        init_from_environment(args.backend)
        records = run_benchmark(args)
        doc = report(records, args) if dist.get_rank() == 0 else None
        dist.destroy_process_group()
        return doc
    if args.backend == "nccl":
        raise ValueError("--backend nccl needs a launcher: torchrun --nproc-per-node G -m "
                         "lsp.launch.bench comm ...")
    from lsp.launch.dist_env import spawn_gloo

    return report(spawn_gloo(run_benchmark, max(int(x) for x in args.ranks.split(",")), args), args)
