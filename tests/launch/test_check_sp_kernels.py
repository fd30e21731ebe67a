"""``python -m lsp.launch.check_sp_kernels --cpu-smoke``: the delta rule's in-op exchange on
three slices simulated in one process (Triton interpreter) equals the one-process op."""

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
    assert {r["gate"] for r in rows} == {"none", "head", "key"}
    for r in rows:
        assert r["ok"] and r["worst"] <= 1e-5 and r["dinit_other_ranks_max"] == 0.0, r
        assert {"o", "dq", "dk", "dv", "dbeta", "dinitial_state"} <= set(r), r
