"""Configuration rules shared by the kernel families: block sizes, chunk and segment counts.

Every kernel runs with one fixed configuration chosen here by rule (no autotuning), so the same
code runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``, where autotuning cannot run)
and on a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..offsets import cached_on, host_offsets

SUB_CHUNK = 16  # rows per sub-chunk (blocked triangular solve, per-channel gate blocks)
MAX_K = 256


def interpreted() -> bool:
    """True when the kernels of this process were built for Triton's CPU interpreter.

    Triton decides at decoration time (``TRITON_INTERPRET`` when a module's ``@triton.jit``
    runs), and every kernel module of ``lsp.kernels`` imports this one, so the flag is read once,
    when the kernels are imported.
    """
    return INTERPRETED


INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a fixed 4 on CPU, for the interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for dots with float32 operands: exact for fp32 inputs, tf32 else."""
    return "ieee" if dtype == torch.float32 else "tf32"


def state_block_v(BK: int, V: int) -> int:
    """Value columns per program of the chunk-state passes (the state tile is ``[BK, BV]``)."""
    cap = 64 if BK <= 128 else 32
    return min(next_pow2(V), cap)


def state_num_warps(BK: int) -> int:
    """Warps for the chunk-state passes (``state.py``, both directions): 4 up to ``BK = 128``.

    The passes are sequential over chunks; at 4 warps twice as many programs are resident per
    multiprocessor as at 8, which hides more of each step's latency (Gated DeltaNet, H200: the
    five passes at H=16, T=64K take 4.6 ms at 4 warps against 7.1 at 8, docs/results.md).
    """
    return 4 if BK <= 128 else 8


# Key columns per program of the per-chunk gradient kernel (``grad.py``), chosen on an H200
# (fwd+bwd at T = 64K, H = 16, K = V = 128; docs/results.md): blocks of 64 for DeltaNet (9.65
# against 10.28 ms whole), whole blocks of 128 with a scalar gate (Gated DeltaNet 11.53 against
# 12.45 ms: every block recomputes the [BT, BT] decay factors and A), even for the others.
GRAD_KEY_BLOCK = 64
GRAD_KEY_BLOCK_SCALAR_GATE = 128


def grad_block_k(BK: int, scalar_gate: bool) -> int:
    """Key columns per program of ``grad_kernel``: blocks of ``GRAD_KEY_BLOCK`` (a program keeps
    ``[64, 64]`` accumulators, with ``dA`` over the value columns computed by each block, as
    fla's ``dqkwg`` does), or ``GRAD_KEY_BLOCK_SCALAR_GATE`` with a scalar gate."""
    return min(BK, GRAD_KEY_BLOCK_SCALAR_GATE if scalar_gate else GRAD_KEY_BLOCK)


def grad_num_warps(BK: int) -> int:
    """Warps for the per-chunk backward kernels (``grad_kernel``, ``wy_bwd_kernel``): 4 up to
    ``BK = 64``, 8 above.

    At ``BK = 64`` the 8-warp builds gave wrong delta-rule gradients on Hopper (Triton 3.6); with
    these counts every device correctness case passes (history: docs/results.md).
    """
    return 4 if BK <= 64 else 8


_STAGES: dict = {}


def launch(kernel, grid, *args, num_warps: int, num_stages: int = 2, **constexprs) -> None:
    """``kernel[grid](*args, **constexprs)``; if the software pipeline's shared memory does not
    fit (Triton's ``OutOfResources``), fall back to ``num_stages=1`` for this configuration."""
    from triton.runtime.errors import OutOfResources

    key = (kernel, num_warps, tuple(sorted(constexprs.items())))
    stages = _STAGES.get(key, num_stages)
    try:
        kernel[grid](*args, num_warps=num_warps, num_stages=stages, **constexprs)
    except OutOfResources:
        if stages == 1:
            raise
        _STAGES[key] = 1
        kernel[grid](*args, num_warps=num_warps, num_stages=1, **constexprs)


# programs per multiprocessor the segment split aims for (choose_segments)
PROGRAMS_PER_SM = 4


def choose_segments(B: int, H: int, NV: int, NT: int, device: torch.device,
                    forced: int | None = None) -> tuple[int, int]:
    """``(P, SEG)``: split each sequence of ``NT`` chunks into ``P`` segments of ``SEG`` chunks.

    A chunk-state pass is sequential over chunks and has only ``B*H*NV`` programs; at small batch
    that leaves most multiprocessors idle. Segments run in parallel (their affine pairs are
    scanned in between), so aim for about ``4 * SMs`` programs (four resident 4-warp programs
    per multiprocessor; more segments did not make the passes faster and lengthen the scan),
    with at least ``8`` chunks per segment so the extra pass stays cheap. ``forced`` (or
    ``LSP_KERNELS_SEGMENTS``) overrides.
    """
    if forced is None and os.environ.get("LSP_KERNELS_SEGMENTS"):
        forced = int(os.environ["LSP_KERNELS_SEGMENTS"])
    if forced is not None:
        P = max(1, min(int(forced), NT))
    else:
        base = B * H * NV
        want = -(-PROGRAMS_PER_SM * sm_count(device) // base)
        P = max(1, min(want, NT // 8))
    SEG = -(-NT // P)
    P = -(-NT // SEG)
    return P, SEG


def prepare_chunk_indices(cu_seqlens: torch.Tensor, BT: int) -> torch.Tensor:
    """``[NT_total, 2]`` int32 ``(document n, chunk c within it)`` of packed documents.

    Chunks never straddle documents (fla's convention): document ``n`` of length ``L_n`` has
    ``cdiv(L_n, BT)`` chunks, its last one ragged, so the per-chunk kernels run one program per
    row and read ``bos = cu_seqlens[n]`` and the local length from the offsets. The total count
    sets the grid; it comes from the offsets' host copy (``offsets.host_offsets``, read once per
    tensor), so building the table does not wait for the GPU.
    """
    cu = host_offsets(cu_seqlens)
    total = sum(-(-(b - a) // BT) for a, b in zip(cu, cu[1:]))
    counts = _chunk_counts(cu_seqlens, BT)
    doc = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                  output_size=total)
    first = torch.cumsum(counts, 0) - counts  # each document's first global chunk
    chunk = torch.arange(total, device=counts.device) - first[doc]
    return torch.stack([doc, chunk], 1).to(torch.int32).contiguous()


def _chunk_counts(cu_seqlens: torch.Tensor, BT: int) -> torch.Tensor:
    lens = cu_seqlens[1:].to(torch.int64) - cu_seqlens[:-1].to(torch.int64)
    return (lens + BT - 1) // BT


class Varlen(NamedTuple):
    """Packed documents (``B = 1``): the offsets and the chunk table built from them, once per
    offsets tensor and chunk size (``Varlen.of``; the layers of a step share them)."""

    cu_seqlens: torch.Tensor  # [N+1] int32 / int64 offsets, on the inputs' device
    chunk_indices: torch.Tensor  # [NT, 2] int32 (document, chunk within it)
    N: int  # documents
    NT: int  # chunks over all documents
    BT: int  # chunk size
    doc_chunks: tuple  # chunks of each document (host ints)

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, BT: int) -> "Varlen":
        def build():
            cu = cu_seqlens.contiguous()
            ci = prepare_chunk_indices(cu, BT)
            host = host_offsets(cu)
            counts = tuple(-(-(b - a) // BT) for a, b in zip(host, host[1:]))
            return cls(cu, ci, cu.numel() - 1, ci.shape[0], BT, counts)
        return cached_on(cu_seqlens, ("varlen", BT), build)

    def segments(self, SEG: int, cut_above: int) -> "Segments":
        """Documents of more than ``cut_above`` chunks cut into segments of at most ``SEG``
        chunks (cached like the table)."""
        return cached_on(self.cu_seqlens, ("segments", self.BT, SEG, cut_above),
                         lambda: Segments.build(self.doc_chunks, SEG, self.cu_seqlens.device,
                                                cut_above))


class Segments(NamedTuple):
    """The state passes' sequences for packed documents: each document of more than
    ``cut_above`` chunks (default ``SEG``) cut into near-equal segments of at most ``SEG`` chunks;
    the others are one segment each.

    ``table`` ``[NS, 4]`` int32 rows ``(document, first chunk, end chunk, document's first
    global chunk)``, document-major; ``split`` the same rows for the documents cut in more than
    one segment (the pair passes run only over those). The scans between the passes go by
    steps: at forward step ``j`` the ``j``-th segment of every document that has one takes
    its start from the segment before it; ``fwd[j-1] = (target, source, source's row in
    split)``, and ``bwd`` likewise from the end of each document backwards.
    """

    table: torch.Tensor
    split: torch.Tensor
    NS: int
    first: torch.Tensor  # [N] int64 each document's first segment
    last: torch.Tensor  # [N] int64 each document's last segment
    fwd: tuple
    bwd: tuple

    @classmethod
    def build(cls, doc_chunks, SEG: int, device, cut_above: int | None = None) -> "Segments":
        cut_above = SEG if cut_above is None else cut_above
        rows, split_rows, first, count, row_of = [], [], [], [], {}
        g0 = 0
        for d, n in enumerate(doc_chunks):
            p = -(-n // SEG) if n > cut_above else 1
            size = -(-n // p)
            first.append(len(rows))
            count.append(p)
            for i in range(p):
                if p > 1:
                    row_of[len(rows)] = len(split_rows)
                    split_rows.append((d, i * size, min(n, (i + 1) * size), g0))
                rows.append((d, i * size, min(n, (i + 1) * size), g0))
            g0 += n
        last = [f + c - 1 for f, c in zip(first, count)]

        def idx(x):
            return torch.tensor(x, dtype=torch.int64, device=device)

        fwd, bwd = [], []
        for j in range(1, max(count)):
            docs = [d for d, c in enumerate(count) if c > j]
            tgt = [first[d] + j for d in docs]
            fwd.append((idx(tgt), idx([t - 1 for t in tgt]), idx([row_of[t - 1] for t in tgt])))
            tgt = [last[d] - j for d in docs]
            bwd.append((idx(tgt), idx([t + 1 for t in tgt]), idx([row_of[t + 1] for t in tgt])))
        table = torch.tensor(rows, dtype=torch.int32, device=device).view(-1, 4)
        split = torch.tensor(split_rows, dtype=torch.int32, device=device).view(-1, 4)
        return cls(table, split, len(rows), idx(first), idx(last), tuple(fwd), tuple(bwd))


def choose_doc_segments(doc_chunks, H: int, NV: int, device: torch.device,
                        forced: int | None = None) -> tuple[int, int]:
    """``(SEG, cut_above)``: packed documents of more than ``cut_above`` chunks are cut into
    segments of at most ``SEG`` chunks.

    ``SEG`` is the rule of :func:`choose_segments` over all the chunks: about
    ``PROGRAMS_PER_SM * SMs`` programs of at least ``8`` chunks, so a long document among short
    ones is cut like one dense sequence of the same total length. Only documents of more than
    ``2 * SEG`` chunks are cut: a cut document runs a pair pass and then its outputs pass, two
    passes of ``SEG`` steps each, which is shorter than one pass over the whole document only
    above ``2 * SEG`` chunks. ``forced`` (or ``LSP_KERNELS_SEGMENTS``) is the number of
    segments the longest document is cut into (every document longer than ``SEG`` is cut).
    """
    if forced is None and os.environ.get("LSP_KERNELS_SEGMENTS"):
        forced = int(os.environ["LSP_KERNELS_SEGMENTS"])
    longest = max(doc_chunks)
    if forced is not None:
        SEG = -(-longest // max(1, min(int(forced), longest)))
        return SEG, SEG
    want = -(-PROGRAMS_PER_SM * sm_count(device) // (H * NV))
    SEG = max(8, -(-sum(doc_chunks) // want))
    return SEG, 2 * SEG


def varlen_pointers(varlen: Varlen | None, dummy: torch.Tensor):
    """``(cu_seqlens, chunk_indices)`` for a kernel launch; a dense call (``None``) passes
    ``dummy`` for both (its ``IS_VARLEN=False`` build never reads them)."""
    if varlen is None:
        return dummy, dummy
    return varlen.cu_seqlens, varlen.chunk_indices


@triton.jit
def doc_span(cu_seqlens, doc):
    """``(bos, T)`` of packed document ``doc``: the row of its first token and its length, int64."""
    bos = tl.load(cu_seqlens + doc).to(tl.int64)
    return bos, tl.load(cu_seqlens + doc + 1).to(tl.int64) - bos


@triton.jit
def chunk_span(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN: tl.constexpr):
    """``(chunk, bos, T)`` of the program's chunk ``i_t``: its index within its sequence, the row
    of the sequence's first token and the sequence's length. Dense: sequence ``i_b`` of the batch,
    ``T`` tokens. Packed documents (``B = 1``): row ``i_t`` of ``chunk_indices`` holds (document,
    chunk within it), and ``cu_seqlens`` the document's offsets, so chunks never straddle one."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos, T = doc_span(cu_seqlens, i_n)
    else:
        i_c = i_t
        bos = i_b * T
    return i_c, bos, T


@triton.jit
def chunk_program(T, NT, cu_seqlens, chunk_indices, H: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Where a per-chunk program (grid ``(NT, B*H, ...)``) works: ``(i_t, i_bh, i_h, i_c, bos,
    T)``, the chunk within its sequence (:func:`chunk_span`), the batch-head (int64), the head,
    the global chunk (``b * NT`` + program row; with packed documents, B = 1, the row of
    ``chunk_indices``: pass ``NT = 0`` where it is not needed), the row of the sequence's first
    token and the sequence's length."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_c = i_b * NT + i_t
    i_t, bos, T = chunk_span(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    return i_t, i_bh, i_h, i_c, bos, T


@triton.jit
def chunk_rows(i_t, i_h, bos, T, H: tl.constexpr, BT: tl.constexpr):
    """A chunk's rows: ``(o_i, o_t, m_t, row)``, positions ``0..BT-1`` in the chunk, in the
    sequence (int64), which of them exist (``< T``), and their rows of a ``[B, T, H, ...]``
    tensor."""
    o_i = tl.arange(0, BT)
    o_t = (i_t * BT + o_i).to(tl.int64)
    m_t = o_t < T
    return o_i, o_t, m_t, (bos + o_t) * H + i_h
