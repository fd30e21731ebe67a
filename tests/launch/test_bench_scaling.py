"""lsp-bench scaling on 1 and 2 gloo ranks: records, weak-scaling ratios and the plot."""

from __future__ import annotations

import json

from lsp.launch import bench_scaling


def test_scaling_benchmark_records_and_report(tmp_path):
    out = tmp_path / "scaling.json"
    bench_scaling.main(["--ranks", "1,2", "--seq-per-rank", "64", "--steps", "2", "--warmup", "1",
                        "--methods", "allscan,allgather", "--out", str(out)])
    recs = json.loads(out.read_text())["records"]
    assert [(r["P"], r["method"]) for r in recs] == [(1, "none"), (2, "allscan"), (2, "allgather")]
    for r in recs:
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and r["steps"] == 2
        assert r["global_seq"] == 64 * r["P"] and r["seq_per_rank"] == 64
    assert recs[0]["exchange_share"] == 0.0 and 0 < recs[1]["exchange_share"] < 1
    rows = json.loads((tmp_path / "scaling.json.report.json").read_text())
    base = recs[0]["step_time_s"]
    for row, rec in zip(rows, recs):
        assert abs(row["ratio_vs_1"] - rec["step_time_s"] / base) < 1e-12
    assert (tmp_path / "scaling.json.png").read_bytes()[:4] == b"\x89PNG"
