"""Shared by the Triton kernel tests: importing kernel modules for the CPU interpreter, and
compiling kernels for sm_90 in a fresh process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys


@contextlib.contextmanager
def interpreted():
    """``TRITON_INTERPRET=1`` while kernel modules are imported (Triton decides at decoration
    whether a kernel is interpreted), restored afterwards so the rest of the suite is unaffected;
    the test modules set it again during their own tests with a fixture."""
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


def env_without_interpreter() -> dict:
    """This process's environment less ``TRITON_INTERPRET``, for a fresh process that decides
    for itself (a kernel is interpreted or not from its decoration on)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def compile_results(script: str) -> dict:
    """Run ``script`` (which prints a JSON dict last) in a fresh process without the interpreter,
    where kernels decorate as real ``JITFunction``s; returns that dict."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env_without_interpreter())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
