"""A step watchdog: when a training step runs longer than ``seconds``, print every thread's Python
stack to stderr (again every ``seconds`` while it lasts), to see where a rank hangs; with
``fatal=True`` (the ``parallel.timeout_s`` deadline) it then ends the process with status
:data:`DEADLINE_EXIT`, so that the launcher ends the other ranks.

The deadline is a thread rather than the process group's timeout because gloo's point-to-point
waits (``batch_isend_irecv(...).wait()``) do not honour that timeout: a rank whose peer is
stopped waits there for ever. ``os._exit`` because a rank blocked in C++ never returns to Python
to raise an exception.

A daemon thread reads the stacks with ``sys._current_frames()`` under the GIL. (``faulthandler``'s
``dump_traceback_later`` reads other threads' frames without the GIL and crashed a test process
when it fired during a running step.) A thread that holds the GIL forever is not reported; ranks
blocked in a collective or a CUDA sync release it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback

__all__ = ["StepWatchdog", "DEADLINE_EXIT"]

DEADLINE_EXIT = 124
"""Exit status of a rank ended by the deadline (as coreutils' ``timeout``)."""


class StepWatchdog:
    """``arm(step)`` at the start of a step, ``disarm()`` at its end; ``close()`` stops the
    thread. Output goes to ``sys.stderr`` as it is at the time of the dump."""

    def __init__(self, seconds: float, label: str = "", fatal: bool = False, what: str = ""):
        if seconds <= 0:
            raise ValueError(f"watchdog seconds={seconds}: use a positive number or leave it off")
        self.seconds, self.label, self.fatal = float(seconds), label, fatal
        self.what = what or f"{self.seconds:g} s"
        self._deadline: float | None = None
        self._step = None
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lsp-step-watchdog", daemon=True)
        self._thread.start()

    def arm(self, step) -> None:
        with self._cv:
            self._step, self._deadline = step, time.monotonic() + self.seconds
            self._cv.notify()

    def disarm(self) -> None:
        with self._cv:
            self._deadline = None

    @contextlib.contextmanager
    def watching(self, step):
        """Armed for the body, disarmed after it."""
        self.arm(step)
        try:
            yield
        finally:
            self.disarm()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cv:
            while not self._stop:
                if self._deadline is None:
                    self._cv.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(timeout=left)
                    continue
                self._dump()
                if self.fatal:
                    os._exit(DEADLINE_EXIT)
                self._deadline = time.monotonic() + self.seconds

    def _dump(self) -> None:
        names = {t.ident: t.name for t in threading.enumerate()}
        kind = "deadline" if self.fatal else "watchdog"
        lines = [f"lsp {kind}{self.label}: step {self._step} has run over {self.what}; "
                 + (f"exiting with status {DEADLINE_EXIT}; " if self.fatal else "")
                 + "stacks (most recent call last):"]
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue
            lines.append(f"--- thread {names.get(ident, ident)}")
            lines.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
        print("\n".join(lines), file=sys.stderr, flush=True)
