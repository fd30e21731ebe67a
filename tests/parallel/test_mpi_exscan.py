"""MPI cross-check: mpi4py's Exscan with a non-commutative operator confirms the exchange."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def mpiexec() -> str:
    # PyPI's mpich wheel (the `test` extra) puts mpiexec beside the interpreter
    cand = Path(sys.executable).parent / "mpiexec"
    found = str(cand) if cand.exists() else shutil.which("mpiexec")
    assert found, "mpiexec not found: install the test extra (pip install -e '.[test]'), which brings mpich"
    return found


def test_mpi_exscan_matches_torch_distributed_on_3_ranks():
    proc = subprocess.run([mpiexec(), "-n", "3", sys.executable, str(HERE / "mpi_exscan_main.py")],
                          cwd=HERE, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in proc.stdout.replace("}{", "}\n{").splitlines()
            if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1, 2]
    for r in rows:
        assert r["P"] == 3
        assert len(r["max_rel_err"]) == 6  # both families x three gate kinds
        assert max(r["max_rel_err"].values()) <= 1e-12, r
