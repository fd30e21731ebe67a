"""Multi-query associative recall (MQAR) at long context, keys early and queries late.

A sample of length ``T`` holds ``num_pairs`` key-value pairs at its very start, filler tokens in
between, and the same keys again (shuffled) in its last ``2 * num_pairs`` positions, each followed
by its value::

    k1 v1 k2 v2 ... kN vN  f f f ... f  q1 a1 q2 a2 ... qN aN

The label at each query ``q_i`` is its value ``a_i``; every other label is ignored. Under context
parallelism the keys sit on the first rank and the queries on the last, so the task can only be
solved if the recurrent state crosses the ranks. Tokens: 0 is filler, keys are ``[1, 1 + nk)``,
values ``[1 + nk, vocab)``.
"""

from __future__ import annotations

import numpy as np
import torch

from lsp.data.loader import IGNORE_INDEX

FILLER = 0


class MQAR:
    """``MQAR(...)(j)`` -> ``(input_ids, labels)`` of sample ``j``, deterministic in ``seed``."""

    def __init__(self, seq_len: int, num_pairs: int = 8, vocab_size: int = 64, seed: int = 0):
        self.num_keys = (vocab_size - 1) // 2
        num_values = vocab_size - 1 - self.num_keys
        if num_pairs > self.num_keys:
            raise ValueError(f"mqar: num_pairs={num_pairs} exceeds the {self.num_keys} distinct "
                             f"keys of vocab_size={vocab_size}; raise vocab_size or lower num_pairs")
        if seq_len < 4 * num_pairs:
            raise ValueError(f"mqar: seq_len={seq_len} is shorter than 4 * num_pairs = "
                             f"{4 * num_pairs}; raise train.seq_len or lower num_pairs")
        self.seq_len, self.num_pairs, self.seed = seq_len, num_pairs, seed
        self.vocab_size, self.num_values = vocab_size, num_values

    def __call__(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, j))
        N, T = self.num_pairs, self.seq_len
        keys = 1 + rng.choice(self.num_keys, size=N, replace=False)
        vals = 1 + self.num_keys + rng.integers(0, self.num_values, size=N)
        x = np.full(T, FILLER, dtype=np.int64)
        y = np.full(T, IGNORE_INDEX, dtype=np.int64)
        x[0:2 * N:2], x[1:2 * N:2] = keys, vals
        order = rng.permutation(N)
        q0 = T - 2 * N
        x[q0::2], x[q0 + 1::2] = keys[order], vals[order]
        y[q0::2] = vals[order]
        return x, y


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """``(correct, total)`` of argmax predictions where a label is set."""
    mask = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & mask
    return int(correct.sum()), int(mask.sum())
