"""``lsp-bench scaling``: end-to-end training-step time under sequence parallelism.

Runs the real training loop (``lsp.train.loop.train``) for a model config with the sequence split
over all ``P`` ranks of the world (CP = P) at ``seq_per_rank`` tokens per rank, once per exchange
method, and records the median step time after warm-up, tokens/s, MFU, the share of step time in
the state exchange and peak memory. Records are appended to ``--out`` (JSON), so running it at
P = 1 and at P = 2, 4, ... (each under its own launcher) collects a weak-scaling table; with
``--strong`` the global length stays ``seq_per_rank`` whatever P (strong scaling).

    torchrun --nproc-per-node 1 -m lsp.launch.bench scaling --model 400m --seq-per-rank 32768 --out s.json
    torchrun --nproc-per-node 2 -m lsp.launch.bench scaling --model 400m --seq-per-rank 32768 --out s.json
    lsp-bench scaling-report --from s.json          # weak-scaling ratios, table, PNG

Without a launcher it spawns gloo ranks on this CPU for each ``--ranks`` count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch.distributed as dist

from lsp.parallel.exchange import METHODS


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="lsp-bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="a configs/model/ option")
    p.add_argument("--seq-per-rank", type=int, default=256)
    p.add_argument("--strong", action="store_true", help="keep the global length fixed")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ranks", default="1,2", help="rank counts to spawn without a launcher")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--out", default="runs/bench/scaling.json")
    p.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides")
    return p.parse_args(argv)


def measure(args) -> list[dict] | None:
    """Run on every rank of an initialised world; rank 0 returns the records."""
    from lsp.train.config import load_config
    from lsp.train.loop import train

    P = dist.get_world_size()
    seq = args.seq_per_rank if args.strong else args.seq_per_rank * P
    methods = args.methods.split(",") if P > 1 else ["none"]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            overrides = [
                "~experiment", f"model={args.model}", "data=stdlib",
                # one stream across documents, as the earlier scaling records (comparable numbers)
                "data.reset_state_at_document_boundaries=false",
                f"data.max_bytes={max(4_000_000, 4 * seq)}", "parallel=default",
                f"parallel.cp={P}", f"parallel.sp_method={method if P > 1 else 'allscan'}",
                f"parallel.activation_checkpointing={str(args.activation_checkpointing).lower()}",
                f"train.seq_len={seq}", f"train.steps={args.warmup + args.steps}",
                "train.log_interval=1", "train.save_interval=0", "train.eval_interval=0",
                "train.resume=none", "train.micro_batch=1", "train.warmup_steps=1",
                "log.tensorboard=false", f"run_dir={tmp}/{method}",
            ] + list(args.set)
            summary = train(load_config(overrides))
            if dist.get_rank() != 0:
                continue
            rows = summary["history"][args.warmup:]
            med = lambda k: statistics.median(r[k] for r in rows if r[k] is not None) \
                if any(r[k] is not None for r in rows) else None
            records.append({
                "model": args.model, "P": P, "method": method, "seq_per_rank": seq // P,
                "global_seq": seq, "scaling": "strong" if args.strong else "weak",
                "activation_checkpointing": args.activation_checkpointing,
                "step_time_s": med("step_time_s"), "tokens_per_s": med("tokens_per_s"),
                "mfu": med("mfu"), "exchange_share": med("exchange_share"),
                "peak_mem_gb": max(r["peak_mem_gb"] for r in rows), "device": summary["device"],
                "backend": dist.get_backend(), "steps": len(rows),
            })
    return records if dist.get_rank() == 0 else None


def append_records(path: str, records: list[dict]) -> None:
    doc = {"records": []}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    doc["records"].extend(records)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)


def report(path: str, plot: bool = True) -> list[dict]:
    """Scaling ratios: step time at P ranks over step time at one rank (same per-rank length for
    weak scaling), per method; prints a table, writes ``<path>.report.json`` and a PNG."""
    with open(path) as f:
        recs = json.load(f)["records"]
    ones = [r for r in recs if r["P"] == 1]
    rows = []
    for r in recs:
        # weak scaling compares with one rank on the same per-rank length, strong with one rank
        # on the same global length
        key = "seq_per_rank" if r["scaling"] == "weak" else "global_seq"
        b = next((x for x in ones if x["model"] == r["model"] and x[key] == r[key]), None)
        ratio = None if b is None or not b["step_time_s"] else r["step_time_s"] / b["step_time_s"]
        rows.append({**r, "ratio_vs_1": ratio})
    print(f"{'model':6} {'scaling':7} {'P':>2} {'method':9} {'seq/rank':>9} {'step s':>8} "
          f"{'ratio':>6} {'exch %':>7} {'tok/s':>10} {'MFU':>6} {'mem GB':>7}")
    for r in rows:
        print(f"{r['model']:6} {r['scaling']:7} {r['P']:>2} {r['method']:9} {r['seq_per_rank']:>9} "
              f"{r['step_time_s']:>8.3f} {'' if r['ratio_vs_1'] is None else format(r['ratio_vs_1'], '.3f'):>6} "
              f"{100 * (r['exchange_share'] or 0):>7.2f} {r['tokens_per_s']:>10.0f} "
              f"{'' if r['mfu'] is None else format(r['mfu'], '.3f'):>6} {r['peak_mem_gb']:>7.2f}")
    with open(path + ".report.json", "w") as f:
        json.dump(rows, f, indent=1)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for method in sorted({r["method"] for r in rows if r["P"] > 1}):
            pts = sorted((r["P"], 1 / r["ratio_vs_1"]) for r in rows
                         if r["method"] == method and r["ratio_vs_1"])
            if pts:
                ax.plot([1] + [p for p, _ in pts], [1.0] + [e for _, e in pts], marker="o",
                        label=method)
        ax.axhline(1 / 1.10, color="k", ls="--", lw=0.8, label="target 1/1.10")
        ax.set_xlabel("ranks P (sequence P x L)")
        ax.set_ylabel("weak-scaling efficiency T(1, L) / T(P, PL)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path + ".png", dpi=110)
        plt.close(fig)
        print(f"wrote {path}.png")
    return rows


def main(argv=None):
    args = parse_args(argv)
    from lsp.launch.dist_env import init_from_environment, launched
    from lsp.launch.train import quiet_library_warnings

    quiet_library_warnings()
    if launched():
        init_from_environment("auto")
        recs = measure(args)
        if dist.get_rank() == 0:
            append_records(args.out, recs)
            print(f"appended {len(recs)} records to {args.out}")
        dist.destroy_process_group()
        return
    from lsp.launch.dist_env import spawn_gloo

    for P in sorted({int(x) for x in args.ranks.split(",")}):
        append_records(args.out, spawn_gloo(measure, P, args))
    report(args.out)
