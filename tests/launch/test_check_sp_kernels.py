"""``python -m lsp.launch.check_sp_kernels --cpu-smoke``: the in-op exchange of both families on
three slices simulated in one process (Triton interpreter) equals the one-process op, and the
timing's closures (``sequence_parallel`` on one rank, in-op and pairs) run and agree."""

from __future__ import annotations

import json
import subprocess
import sys

from triton_env import env_without_interpreter


def test_check_sp_kernels_cpu_smoke(tmp_path):
    out = tmp_path / "sp.json"
    # a fresh process: the interpreter flag must be set before the kernels are decorated
    proc = subprocess.run([sys.executable, "-m", "lsp.launch.check_sp_kernels", "--cpu-smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=env_without_interpreter())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["check"]
    chains = [r for r in rows if "part" not in r]
    assert {(r["family"], r["gate"]) for r in chains} == {
        (f, g) for f in ("delta_rule", "linear_attention") for g in ("none", "head", "key")}
    for r in chains:
        assert r["ok"] and r["worst"] <= 1e-5 and r["dinit_other_ranks_max"] == 0.0, r
        assert {"o", "dq", "dk", "dv", "dinitial_state"} <= set(r), r
        assert ("dbeta" in r) == (r["family"] == "delta_rule"), r
    variants = [r for r in rows if r.get("part") == "variants"]
    assert len(variants) == 6 and all(r["ok"] and r["worst"] <= 1e-5 for r in variants), variants
