"""lsp-bench kernels in its CPU small form: every family and gate under Triton's interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from triton_env import env_without_interpreter


def test_bench_kernels_cpu_smoke_writes_json(tmp_path):
    out = tmp_path / "kernels.json"
    # a fresh process: the interpreter flag must be set before the kernels are decorated
    proc = subprocess.run([sys.executable, "-m", "lsp.launch.bench", "kernels", "--cpu-smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=env_without_interpreter())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    recs = doc["correctness"]
    assert {(r["family"], r["gate"]) for r in recs} == {
        (f, g) for f in ("linear_attention", "delta_rule") for g in ("none", "head", "key")}
    for r in recs:
        assert r["ok"] and r["finite"] and r["worst"] <= 1e-4, r
    assert "correctness: 6/6 passed" in proc.stdout


def test_op_pairs_names_every_op_or_refuses_an_unknown_one():
    from lsp.launch.bench_kernels import op_pairs

    assert len(op_pairs("all")) == 6
    assert op_pairs("linear_attention:key,delta_rule:none") == [
        ("linear_attention", "key"), ("delta_rule", "none")]
    with pytest.raises(SystemExit, match="unknown pair 'delta_rule:scalar'"):
        op_pairs("delta_rule:scalar")
    with pytest.raises(SystemExit, match="--ops: unknown pair 'gla:key'"):
        op_pairs("gla:key", "--ops")
