"""``lsp-bench``: benchmarks that print a table and write JSON (and PNG plots).

Subcommands:
    comm       time the state exchange alone per method, transition kind, size and rank count;
               fit the alpha-beta cost model and predict to 256 ranks (launch/bench_comm.py)
    costmodel  refit and re-plot from an earlier comm.json (no processes started)
    scaling    end-to-end step time with the sequence over all ranks, per method
               (launch/bench_scaling.py); records append to a JSON file
    scaling-report  weak/strong-scaling ratios, table and PNG from that file
    kernels    the kernel correctness and timing table (launch/bench_kernels.py; GPU)
    attention  flash against cuDNN attention on the model's block shapes, forward and
               backward, with an agreement check (launch/bench_attention.py; GPU)

Run ``lsp-bench <subcommand> --help`` for options.
"""

from __future__ import annotations

import argparse
import json
import sys


def _costmodel(argv):
    from lsp.launch import bench_comm

    p = argparse.ArgumentParser(prog="lsp-bench costmodel")
    p.add_argument("--from", dest="src", required=True, help="a comm.json written by lsp-bench comm")
    p.add_argument("--out", default=None, help="output folder (default: beside --from)")
    a = p.parse_args(argv)
    with open(a.src) as f:
        records = json.load(f)["records"]
    import os

    args = bench_comm.parse_args(["--out", a.out or os.path.dirname(os.path.abspath(a.src))])
    bench_comm.report(records, args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    def _scaling_report(rest):
        p = argparse.ArgumentParser(prog="lsp-bench scaling-report")
        p.add_argument("--from", dest="src", required=True)
        p.add_argument("--no-plots", action="store_true")
        a = p.parse_args(rest)
        from lsp.launch.bench_scaling import report

        report(a.src, plot=not a.no_plots)

    def _kernels(rest):
        from lsp.launch import bench_kernels

        sys.argv = ["lsp-bench kernels"] + list(rest)
        bench_kernels.main()

    commands = {"comm": lambda rest: __import__("lsp.launch.bench_comm", fromlist=["main"]).main(rest),
                "costmodel": _costmodel,
                "scaling": lambda rest: __import__("lsp.launch.bench_scaling", fromlist=["main"]).main(rest),
                "scaling-report": _scaling_report,
                "kernels": _kernels,
                "attention": lambda rest: __import__("lsp.launch.bench_attention",
                                                     fromlist=["main"]).main(rest)}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"lsp-bench: unknown subcommand {argv[0]!r}; choose one of {sorted(commands)}")
            sys.exit(2)
        return
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
