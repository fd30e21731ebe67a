"""Deterministic batches: which sample each data-parallel rank takes at each step, and each
context-parallel rank's contiguous slice of it.

The global sample counter is the whole data position: sample ``j`` of the run is the same on every
machine for a given seed, so resuming needs only the number of samples consumed. For a token
stream, sample ``j`` is window ``perm_e[j mod W]`` of the ``W = (len - 1) // seq_len``
non-overlapping windows (``seq_len + 1`` tokens each, for the shifted labels), with a fresh
seeded permutation ``perm_e`` every epoch ``e = j // W``.

Packed documents: a window crosses document ends. With ``documents=True`` each sample also has
its document offsets (``cu_seqlens``: 0, every document start inside the window, ``seq_len``),
taken from the stream's ``doc_starts``; the batch carries them per row, the same on every CP rank
(global offsets of the row), and the model resets every state at each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    """One micro-batch on one rank: this CP rank's slice of the inputs and labels, and for
    packed documents each row's GLOBAL offsets (``DecoderLM.forward``'s ``cu_seqlens``)."""

    input_ids: torch.Tensor  # [B, T_local] int64
    labels: torch.Tensor  # [B, T_local] int64, IGNORE_INDEX where no loss is taken
    cu_seqlens: list[torch.Tensor] | None = None  # B tensors [N_b + 1] int32, offsets of the row

    def to(self, device) -> "Batch":
        cu = None if self.cu_seqlens is None else [c.to(device) for c in self.cu_seqlens]
        return Batch(self.input_ids.to(device, non_blocking=True),
                     self.labels.to(device, non_blocking=True), cu)


class StreamSamples:
    """Samples of ``seq_len`` tokens (and shifted labels) from a token stream; with
    ``documents`` (a stream with ``doc_starts``) also each sample's document offsets."""

    def __init__(self, stream, seq_len: int, seed: int, documents: bool = False):
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.documents = documents
        self.num_windows = (len(stream) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"data has {len(stream)} tokens, fewer than one window of seq_len+1 = "
                f"{seq_len + 1}; lower train.seq_len or use more data"
            )
        self._perm_epoch, self._perm = None, None
        self.vocab_size = stream.vocab_size

    def _window(self, j: int) -> int:
        epoch, i = divmod(j, self.num_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def __call__(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        w = self.stream.window(self._window(j) * self.seq_len, self.seq_len + 1)
        return w[:-1], w[1:]

    def offsets(self, j: int) -> np.ndarray:
        """Document offsets of sample ``j``'s input tokens: ``[0, starts inside..., seq_len]``."""
        s, n = self._window(j) * self.seq_len, self.seq_len
        starts = self.stream.doc_starts
        inside = starts[np.searchsorted(starts, s, side="right"):
                        np.searchsorted(starts, s + n, side="left")]
        return np.concatenate([[0], inside - s, [n]]).astype(np.int64)


class WindowSampler:
    """Micro-batches for one data-parallel rank, from a global sample counter.

    ``samples(j)`` returns ``(input_ids, labels)`` of length ``seq_len`` for global sample ``j``.
    Step ``s``, micro-batch ``m`` on data-parallel rank ``d`` takes samples
    ``((s * accum + m) * dp + d) * micro_batch + b`` for ``b < micro_batch``.
    """

    def __init__(self, samples, micro_batch: int, dp_rank: int, dp_size: int, accum: int = 1):
        self.samples, self.micro_batch = samples, micro_batch
        self.dp_rank, self.dp_size, self.accum = dp_rank, dp_size, accum

    def samples_per_step(self) -> int:
        return self.micro_batch * self.dp_size * self.accum

    def micro_batch_at(self, step: int, micro: int, cp_rank: int = 0, cp_size: int = 1) -> Batch:
        base = ((step * self.accum + micro) * self.dp_size + self.dp_rank) * self.micro_batch
        pairs = [self.samples(base + b) for b in range(self.micro_batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.int64))
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
        cu = None
        if getattr(self.samples, "documents", False):
            cu = [torch.from_numpy(self.samples.offsets(base + b).astype(np.int32))
                  for b in range(self.micro_batch)]
        return rank_slice(Batch(x, y, cu), cp_rank, cp_size)


def rank_slice(batch: Batch, cp_rank: int, cp_size: int) -> Batch:
    """This CP rank's contiguous slice ``[r T / P, (r + 1) T / P)`` (never a zigzag split); the
    document offsets stay global (every rank needs them whole)."""
    T = batch.input_ids.shape[1]
    if T % cp_size:
        raise ValueError(
            f"sequence length {T} is not divisible by cp={cp_size}; choose train.seq_len as a "
            f"multiple of {cp_size}"
        )
    n = T // cp_size
    sl = slice(cp_rank * n, (cp_rank + 1) * n)
    return Batch(batch.input_ids[:, sl].contiguous(), batch.labels[:, sl].contiguous(),
                 batch.cu_seqlens)
