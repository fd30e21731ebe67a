"""One run per run directory: an exclusive ``flock`` on ``<run_dir>/.lsp-run.lock``.

The process that starts the ranks (rank 0 under torchrun / mpirun) takes the lock before any
rank trains and holds it for the whole run; the kernel releases it when that process exits,
however it exits (a crash or SIGKILL included), so a stale lock cannot outlive its run. The file
names the holder (pid, host, command, start time) for the error a second run gets. ``flock``
works across processes of one host and on most shared file systems; runs on several hosts
writing one run directory are as safe as the file system's ``flock``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = ".lsp-run.lock"


class RunDirLock:
    """``with RunDirLock(run_dir).acquire(): ...``; ``acquire`` raises ``ValueError`` naming the
    run that holds the lock."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._file = None

    def acquire(self) -> "RunDirLock":
        os.makedirs(self.run_dir, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read()
            f.close()
            raise ValueError(f"run_dir={self.run_dir} is in use by another run "
                             f"({_describe(holder)}); a run directory holds one run: wait for "
                             "that run to end (or stop it), or pick another run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "command": " ".join(sys.argv),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        return (f"pid {h['pid']} on host {h['host']}, started {h['started']}, "
                f"command: {h['command']}")
    except (ValueError, KeyError, TypeError):
        return "its lock file names no holder yet"
