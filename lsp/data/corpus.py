"""The embedded default corpus: byte-level tokens of the Python standard library's sources.

Every machine with Python has these files, so the main job needs no download. Files are taken in
sorted order of their path relative to the standard library root; a file goes to the validation
split when a hash of that relative path falls in the last ``valid_percent`` of the range, so the
split is the same on every machine with the same files. Each file is one document, ended by a
newline and a form feed (byte 12, the end-of-document token: it never occurs inside a source file
by convention); ``doc_starts`` holds where each document begins (packed-document training resets
every state there).
Tokens are bytes: a vocabulary of 256.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
DOC_SEPARATOR = b"\n\x0c"


def _python_files(root: Path) -> list[Path]:
    """``root.rglob("*.py")`` without descending into ``site-packages`` folders, whose files are
    left out anyway (a Python's own site-packages can hold tens of thousands of files: walking
    it took most of a small run's data set-up); symlinked folders are not followed, as rglob."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d != "site-packages"]
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    return found


class StdlibCorpus:
    """Token stream (``np.uint8``) of one split, plus document start offsets."""

    def __init__(self, split: str = "train", valid_percent: float = 2.0, root: str | None = None,
                 max_bytes: int | None = None):
        if split not in ("train", "valid"):
            raise ValueError(f"split={split!r}; choose 'train' or 'valid'")
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise ValueError(f"standard library folder {self.root} not found; pass data.root")
        files = sorted(p for p in _python_files(self.root)
                       if "site-packages" not in p.parts and p.is_file())
        chunks, starts, total = [], [], 0
        for p in files:
            rel = p.relative_to(self.root).as_posix()
            h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:4], "big") / 2**32
            if (h >= 1 - valid_percent / 100) != (split == "valid"):
                continue
            try:
                data = p.read_bytes()
            except OSError:
                continue
            starts.append(total)
            chunks.append(data + DOC_SEPARATOR)
            total += len(data) + len(DOC_SEPARATOR)
            if max_bytes is not None and total >= max_bytes:
                break
        if total < 2:
            raise ValueError(f"no source files found under {self.root} for split {split!r}")
        self.tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        self.doc_starts = np.asarray(starts, dtype=np.int64)
        self.vocab_size = VOCAB_SIZE

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64."""
        return self.tokens[start:start + length].astype(np.int64)
