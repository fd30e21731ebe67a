"""lsp-bench comm on 3 gloo ranks, and the cost model's fit on synthetic timings."""

from __future__ import annotations

import json
import random

import pytest

from lsp.launch import bench_comm, costmodel


def test_comm_benchmark_writes_json_and_png(tmp_path):
    out = tmp_path / "comm"
    bench_comm.main(["--ranks", "2,3", "--shapes", "2x8x8,4x16x16", "--warmup", "1",
                     "--repeats", "3", "--out", str(out)])
    doc = json.loads((out / "comm.json").read_text())
    recs = doc["records"]
    # every method x kind x direction x shape x P, each with the documented fields
    assert len(recs) == 3 * 3 * 2 * 2 * 2
    for r in recs:
        assert set(bench_comm.RECORD_FIELDS) <= set(r), set(bench_comm.RECORD_FIELDS) - set(r)
        assert r["backend"] == "gloo" and r["repeats"] == 3
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    # bytes: All-Gather brings every other rank's pair in, the chains one state
    ag = next(r for r in recs if r["method"] == "allgather" and r["kind"] == "full"
              and r["direction"] == "forward" and r["P"] == 3 and r["H"] == 4)
    assert ag["bytes_in_per_rank"] == 2 * (4 * 16 * 16 + 4 * 16 * 16) * 4
    ring = next(r for r in recs if r["method"] == "ring" and r["P"] == 3 and r["H"] == 4)
    assert ring["bytes_in_per_rank"] == 4 * 16 * 16 * 4
    assert "gloo" in doc["fit"] and {"p2p", "allgather"} <= set(doc["fit"]["gloo"])
    assert {r["P"] for r in doc["predictions"]} == {2, 4, 8, 16, 32, 64, 128, 256}
    assert {r["P"] for r in doc["zeco_comparison"]} == {8, 256}
    for png in ("comm_time_vs_P.png", "comm_costmodel.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # `lsp-bench costmodel` refits and re-plots from the JSON alone
    from lsp.launch.bench import main as bench_main

    bench_main(["costmodel", "--from", str(out / "comm.json"), "--out", str(tmp_path / "refit")])
    refit = json.loads((tmp_path / "refit" / "comm.json").read_text())
    assert refit["fit"] == doc["fit"] and (tmp_path / "refit" / "comm_costmodel.png").exists()


@pytest.mark.parametrize("pattern,methods", [("p2p", ("ring", "allscan")),
                                             ("allgather", ("allgather",))])
def test_cost_model_fit_recovers_alpha_beta(pattern, methods):
    """Synthetic timings from known (alpha, beta) with 1% noise: the fit is within 5%."""
    truth = costmodel.Link(alpha=12e-6, beta=40e9)
    rng = random.Random(0)
    records = []
    for P in (2, 3, 4, 8):
        for H, K, V in ((4, 32, 32), (16, 64, 64), (16, 128, 128), (32, 128, 256)):
            s, a = H * K * V * 4, H * K * K * 4
            for method in methods:
                for n in ((1, 2, 4) if method == "allscan" else (1,)):
                    for direction in ("forward", "backward"):
                        t = costmodel.predict(truth, method, P, s, a, n, direction)
                        records.append({"backend": "nccl", "method": method, "P": P,
                                        "state_bytes": s, "trans_bytes": a, "num_blocks": n,
                                        "direction": direction,
                                        "median_ms": t * 1e3 * (1 + rng.uniform(-0.01, 0.01))})
    link = costmodel.fit_records(records)["nccl"][pattern]
    assert abs(link.alpha / truth.alpha - 1) < 0.05, link
    assert abs(link.beta / truth.beta - 1) < 0.05, link


def test_cost_model_shapes():
    link = costmodel.Link(alpha=10e-6, beta=50e9)
    s = 16 * 128 * 128 * 4
    # one block All-Scan is the ring; two ranks: one hop each
    assert costmodel.predict(link, "allscan", 5, s, num_blocks=1) == costmodel.predict(link, "ring", 5, s)
    assert costmodel.critical_path("allgather", 2, s, s) == (1.0, 2.0 * s)
    # pipelining pays at many ranks: All-Scan with its best blocks beats the ring
    assert costmodel.predict(link, "allscan", 64, s) < 0.5 * costmodel.predict(link, "ring", 64, s)
    # and for full [K, K] transitions All-Scan overtakes All-Gather at some P
    assert costmodel.crossover(link, link, s, s) is not None
