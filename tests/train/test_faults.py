"""Faults of a training job on CPU ranks: a stopped rank, a second run in one run directory,
Ctrl-C to the launcher, a failing rank, a non-finite loss, a crash and resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lsp.launch.train import main
from lsp.testing import run_in_child

FAST = ["data.max_bytes=200000", "train.log_interval=1", "train.seq_len=64",
        "train.eval_interval=0", "log.tensorboard=false"]
EXE = Path(sys.executable).parent / "lsp-train"


class Job:
    """``lsp-train`` in a subprocess of its own session; its stdout and stderr are collected."""

    def __init__(self, args):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen([str(EXE)] + args, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.out, self.err = [], []
        self._threads = [threading.Thread(target=self._pump, args=(s, d), daemon=True)
                         for s, d in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, lines):
        for line in stream:
            lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(re.search(pattern, line) for line in self.out + self.err):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in the output:\n{self.text()}")

    def rank_pids(self) -> list[int]:
        self.wait_for(r"ranks 0\.\.\d+ are pids", 60)
        line = next(x for x in self.err if "are pids" in x)
        return [int(p) for p in re.findall(r"\d+", line.split("are pids")[1])]

    def text(self) -> str:
        return "".join(self.out)[-3000:] + "".join(self.err)[-5000:]

    def kill(self, pids=()):
        for pid in list(pids) + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


TIMEOUT_S = 8


def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path):
    """Rank 1 stopped (SIGSTOP) after step 3: rank 0 waits for it in a collective (gloo's
    point-to-point waits ignore the process group's timeout) until parallel.timeout_s, dumps its
    stacks and exits; the launcher then ends rank 1 (which cannot handle SIGTERM) and fails."""
    job = Job(["parallel=cp2", f"run_dir={tmp_path}", "train.steps=100000",
               f"parallel.timeout_s={TIMEOUT_S}"] + FAST)
    pids = []
    try:
        pids = job.rank_pids()
        job.wait_for(r"step\s+3 \|", 120)
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        code = job.proc.wait(timeout=TIMEOUT_S + 30)
        took = time.monotonic() - stopped
        for t in job._threads:
            t.join(5)
    finally:
        job.kill(pids)
    err = "".join(job.err)
    assert code != 0 and took < TIMEOUT_S + 15, (code, took, job.text())
    assert f"lsp deadline (rank 0): step" in err and f"parallel.timeout_s={TIMEOUT_S} s" in err
    assert "rank 0 failed first" in err and "outlasted parallel.timeout_s" in err, job.text()
    assert not any(alive(p) for p in pids)


def test_second_run_is_refused_and_sigint_to_the_launcher_ends_every_rank(tmp_path, capsys):
    job = Job(["parallel=cp2", f"run_dir={tmp_path}", "train.steps=100000"] + FAST)
    pids = []
    try:
        pids = job.rank_pids()
        job.wait_for(r"step\s+1 \|", 120)
        # one run per run directory: a second one is refused before any rank starts
        with pytest.raises(SystemExit) as exit_info:
            main(["parallel=cp2", f"run_dir={tmp_path}", "train.steps=5"] + FAST)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"run_dir={tmp_path} is in use by another run" in err[0], err
        assert f"pid {job.proc.pid} on host " in err[0] and "command: " in err[0], err
        assert all(alive(p) for p in pids)  # the first run goes on
        # SIGINT to the launcher's PID (not its process group) ends every rank at once
        os.kill(job.proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        code = job.proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        job.kill(pids)
    assert code == 130 and took < 10, (code, took, job.text())
    time.sleep(0.5)
    assert not any(alive(p) for p in pids), job.text()
    # the lock went with the run: the directory takes a new run
    run_in_child(main, ["parallel=single", f"run_dir={tmp_path}", "train.steps=1",
                        "train.resume=none"] + FAST)


def test_the_rank_that_failed_first_is_named(tmp_path):
    """Bad input on rank 1 only: rank 0 sees gloo's 'Connection closed by peer'; the launcher's
    error names rank 1 and its error."""
    from fault_cases import bad_input_on_rank1

    from lsp.launch.dist_env import RankFailed, spawn_ranks

    with pytest.raises(RankFailed) as info:
        spawn_ranks(bad_input_on_rank1, 2, (2, str(tmp_path / "store")))
    msg = str(info.value)
    assert msg.startswith("rank 1 failed first: it exited with status 1"), msg
    assert "ValueError: bad input on rank 1 only" in msg and "ranks [0]" in msg, msg


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


NAN_ARGS = ["parallel=single", "train.steps=6", "train.save_interval=3"] + FAST


@pytest.mark.parametrize("where", ["loss", "grad_norm"])
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_checkpoint(where, tmp_path,
                                                                       monkeypatch):
    """A NaN (inf) injected at step 5: the run stops naming the step and the value, before the
    optimizer step; the last checkpoint (step 3) still loads, finite. Resumed, the run replays
    step 4, which the stopped run had logged too: metrics.jsonl keeps one row per step."""
    import lsp.parallel.grads as grads
    from lsp.model import DecoderLM

    calls = {"n": 0}
    if where == "loss":  # poison the model's output at the fifth forward
        forward = DecoderLM.forward

        def poisoned(self, *a, **kw):
            out = forward(self, *a, **kw)
            calls["n"] += 1
            if calls["n"] == 5:
                out.loss = out.loss * float("nan")
                out.lm_loss = out.lm_loss * float("nan")
            return out
        monkeypatch.setattr(DecoderLM, "forward", poisoned)
    else:  # poison one gradient at the fifth step
        reduce = grads.reduce_gradients

        def poisoned(model, topo):
            reduce(model, topo)
            calls["n"] += 1
            if calls["n"] == 5:
                next(p for p in model.parameters() if p.grad is not None).grad[0] = float("inf")
        monkeypatch.setattr(grads, "reduce_gradients", poisoned)
    with pytest.raises(RuntimeError, match="step 5: the " + ("loss is nan" if where == "loss"
                                                             else "gradient norm is inf")) as e:
        run_in_child(main, [f"run_dir={tmp_path}"] + NAN_ARGS)  # the patches are inherited
    assert "step_00000003" in str(e.value) and "stopped before the optimizer step" in str(e.value)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    state = torch.load(ckpt / "step_00000003" / "model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state.values())
    if where == "grad_norm":
        return
    monkeypatch.undo()
    # resumes from step 3, replays step 4, finishes
    run_in_child(main, [f"run_dir={tmp_path}"] + NAN_ARGS)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(math.isfinite(r["loss"])
                                                                  for r in rows)
