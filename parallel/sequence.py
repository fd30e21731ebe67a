"""Sequence parallelism for the lsp ops: ``sequence_parallel(op, *shard, group, method)``.

Each rank of ``group`` holds a contiguous slice of the sequence, in rank order. A rank computes
its slice from a zero state, exchanges only ``[K, V]`` states with the other ranks (an exclusive
scan of affine pairs, ``lsp.parallel.exchange``), and adds the effect of the incoming state with
one ``[T, K] @ [K, V]`` matmul per head. The result equals the matching slice of the op run on the
whole sequence in one process, with gradients, for every family and method.

Overlap plan (order of work on a rank):

1. ``pair``: the slice's transition and zero-start final state ``(A_r, B_r)``. For the linear
   attention family this is closed form (one GEMM per head), so it is ready before the op runs;
   for the delta rules it comes out of the single chunkwise pass (``parallel/pairs.py``).
2. On CUDA, record an event on the current stream, and enqueue the whole exchange on a side
   stream that waits for that event only (NCCL kernels and the per-hop ``A S + B`` updates run
   there; no host synchronisation anywhere, including All-Scan's per-block receive-combine-send
   chain, because NCCL's ``work.wait()`` only makes the side stream wait).
3. ``outputs``: the zero-start local outputs ``o0`` and effective queries ``qe``. These kernels
   are enqueued on the main stream after the event, so the GPU runs them while the exchange is in
   flight. (For the delta rules the pass of step 1 already produced them; the exchange then
   overlaps only with what the caller enqueues before consuming the result.)
4. The main stream waits for the side stream, then ``o = o0 + qe @ S_start``.

On the Triton kernels both families take another route: the op itself calls the exchange
between its segment-pair pass and its output pass (forward), and between its local reverse pass
and its per-chunk gradients (backward); see :class:`_KernelBoundary`. There is nothing to
overlap (the outputs need the incoming state), but the delta rule runs once at width ``V``
instead of ``V + K``, and linear attention needs no effective-query correction.

Backward: autograd reaches the exchange once ``G_r = qe^T dO`` is known; the reverse scan runs
on the current stream (it is one state per rank, and the local backward needs its result).
On CPU (gloo) receives block the host, so the exchange runs where it is called: sequential, as
allowed; the chain methods still forward each block as soon as it arrives.

Safety: before any exchange every rank all-gathers a small description of its call (shard
length, batch, heads, K, V, dtype, family, gate kind, method, initial/final state, blocks); any
difference raises the same ``ValueError`` on every rank instead of a hang. Every rank takes part
in every collective of forward and backward, rank 0 with its empty prefix included.

Gradient of ``initial_state`` (the state before the whole global sequence, the same tensor on
every rank): returned whole on the first rank of the group and as zeros on the others, so that
the sum over ranks (what a data-parallel style all-reduce computes) is the true gradient, and the
first rank alone already holds it. The returned final state is replicated on every rank; as for
any replicated output, its true gradient is the sum of the gradients that arrive on all ranks,
and the backward sums them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import astuple, dataclass, fields
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lsp.parallel import packed, pairs
from lsp.parallel.contract import Family, OpCall, Transition, spec_of
from lsp.parallel.exchange import METHODS, all_gather_rows, check_method, make_exchange

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FAMILIES, _TRANSITIONS = tuple(Family), tuple(Transition)
_MAGIC = 0x15B5
_side_streams: dict = {}


class ExchangeTimer:
    """Time spent in the state exchange (forward and backward), for the training log.

    Pass one to :func:`sequence_parallel` (``timer=``). On CPU it sums host time around each
    exchange; on CUDA it records event pairs on the stream that runs the exchange and sums them
    in ``seconds()``, which synchronises on those events only.
    """

    def __init__(self):
        self._host = 0.0
        self._events: list = []

    def reset(self) -> None:
        self._host, self._events = 0.0, []

    def seconds(self) -> float:
        total = self._host
        for start, end in self._events:
            end.synchronize()
            total += start.elapsed_time(end) / 1e3
        return total

    def run(self, fn, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn()
        self._host += time.perf_counter() - t0
        return out


def _timed(timer: ExchangeTimer | None, fn, device: torch.device):
    return fn() if timer is None else timer.run(fn, device)


@dataclass(frozen=True)
class CallMeta:
    """What every rank of the group must agree on, as integers for one all-gather."""

    magic: int
    family: int
    transition: int
    method: int
    T_local: int
    B: int
    H: int
    K: int
    V: int
    dtype: int
    initial_state: int
    final_state: int
    num_blocks: int
    scale_e6: int
    documents: int = 0
    offsets_digest: int = 0

    @classmethod
    def of(cls, call: OpCall, method: str, num_blocks: int | None,
           packed: tuple[int, int] = (0, 0)) -> "CallMeta":
        B, T, H, K = call.q.shape
        n_blk = num_blocks if method == "allscan" else 1
        return cls(_MAGIC, _FAMILIES.index(call.family), _TRANSITIONS.index(call.transition),
                   METHODS.index(method), T, B, H, K, call.v.shape[-1],
                   _DTYPES.index(call.q.dtype), int(call.initial_state is not None),
                   int(call.output_final_state), 0 if n_blk is None else n_blk,
                   round(call.scale * 1e6), *packed)

    @staticmethod
    def describe(name: str, value: int) -> str:
        """A field's value as a user reads it (names, not codes)."""
        table = {"family": _FAMILIES, "transition": _TRANSITIONS, "method": METHODS,
                 "dtype": _DTYPES}.get(name)
        if table is not None:
            item = table[value] if 0 <= value < len(table) else value
            return str(getattr(item, "value", item)).replace("torch.", "")
        if name in ("initial_state", "final_state"):
            return str(bool(value))
        if name == "scale_e6":
            return f"{value / 1e6:g}"
        return str(value)


def _check_consistency(group, meta: CallMeta, device: torch.device) -> None:
    """All-gather every rank's call description; raise the same error everywhere on mismatch."""
    backend = dist.get_backend(group)
    dev = device if backend == "nccl" else torch.device("cpu")
    row = torch.tensor(astuple(meta), dtype=torch.int64, device=dev)
    allm = all_gather_rows(row, group).cpu()
    names = [f.name for f in fields(CallMeta)]
    bad = [i for i in range(len(names)) if not bool((allm[:, i] == allm[0, i]).all())]
    if bad:
        parts = []
        for i in bad:
            vals = [CallMeta.describe(names[i], int(x)) for x in allm[:, i]]
            parts.append(f"{names[i].replace('scale_e6', 'scale')}=[{', '.join(vals)}]")
        raise ValueError(
            f"sequence_parallel: the ranks of the group disagree on {', '.join(parts)} (per "
            "rank); every rank must call with the same op, gate kind, method, head counts and "
            "dims, and an equal contiguous shard of the sequence (split T into P equal parts in "
            "rank order); with cu_seqlens, the same global offsets and initial states"
        )


def _side_stream(device: torch.device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


class _StateScan(torch.autograd.Function):
    """``(A_r, B_r, S_init) -> (S_start_r, S_final)`` across the group; adjoint in backward."""

    @staticmethod
    def forward(ctx, A, B, S_init, exchange, ready_event, timer):
        ctx.exchange, ctx.timer = exchange, timer
        ctx.has_A, ctx.has_init = A is not None, S_init is not None
        if B.is_cuda:
            main = torch.cuda.current_stream(B.device)
            side = _side_stream(B.device)
            side.wait_event(ready_event)
            with torch.cuda.stream(side):
                S_start, S_final = _timed(timer, lambda: exchange.forward(A, B, S_init), B.device)
            for t in (A, B, S_init):
                if t is not None:
                    t.record_stream(side)
            for t in (S_start, S_final):
                if t is not None:
                    t.record_stream(main)
            main.wait_stream(side)
        else:
            S_start, S_final = _timed(timer, lambda: exchange.forward(A, B, S_init), B.device)
        ctx.save_for_backward(A, S_start)
        if S_final is None:
            return S_start, None
        return S_start, S_final

    @staticmethod
    def backward(ctx, G, dS_final):
        A, S_start = ctx.saved_tensors
        ex = ctx.exchange
        kind = ex.kind
        if dS_final is None and ex.need_final:
            dS_final = torch.zeros_like(G)
        D_next = _timed(ctx.timer, lambda: ex.backward(G.contiguous(), dS_final), G.device)
        dA = pairs.grad_transition(kind, D_next, S_start) if ctx.has_A else None
        dS_init = None
        if ctx.has_init and ctx.needs_input_grad[2]:
            if ex.g.rank == 0:
                dS_init = pairs.apply_adjoint(kind, A, D_next) + G
            else:
                dS_init = torch.zeros_like(G)
        return dA, D_next, dS_init, None, None, None


def _bind(op: Callable, args: tuple, kwargs: dict) -> OpCall:
    """The op's validated call from this rank's arguments (the op's own checks and errors)."""
    spec = spec_of(op)
    try:
        return spec.bind(*args, **kwargs)
    except TypeError as e:  # wrong positional count or an unknown keyword
        raise ValueError(f"sequence_parallel: {spec.family.value}: {e}; pass the op's own "
                         "tensors and keywords (scale, initial_state, output_final_state, "
                         "backend)") from e


def sequence_parallel(
    op: Callable,
    *args: Tensor,
    group=None,
    method: str = "allscan",
    num_blocks: int | None = None,
    seq_len: int | None = None,
    check: bool = True,
    timer: ExchangeTimer | None = None,
    ablate_incoming_state: bool = False,
    equal_lengths: bool = True,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Run ``op`` over a sequence split across the ranks of ``group``.

    Args:
        op: ``lsp.ops.linear_attention`` or ``lsp.ops.delta_rule``.
        *args: this rank's contiguous shard of the op's tensors, ``[B, T_local, H, D]`` (and
            ``beta``, ``g`` with ``T_local`` tokens), in the rank order of ``group``. Every rank
            must hold the same number of tokens.
        group: a ``torch.distributed`` process group (None: the default group). gloo (CPU
            tensors) and NCCL (CUDA tensors) work.
        method: one of ``lsp.parallel.METHODS``: ``"allscan"`` (pipelined chain, ZeCO),
            ``"allgather"`` (LASP-2) or ``"ring"`` (LASP-1); see ``lsp.parallel.exchange``
            for their costs.
        num_blocks: All-Scan blocks along V (default: ``exchange.default_num_blocks``).
        seq_len: optional global sequence length; when given it must equal ``P * T_local``.
        check: all-gather a description of the call first and raise on every rank if the ranks
            disagree (see Safety above). It costs one small collective (and, on NCCL, a host
            sync); a training loop with static shapes may pass ``check=False`` after its first
            step, on every rank alike.
        timer: an :class:`ExchangeTimer` that adds up the time of the exchange, or None.
        equal_lengths: ``False`` lets the ranks hold different numbers of tokens (the exchange
            moves only states, whose shape does not depend on the length; e.g. a memory of
            routed Mixture-of-Memories runs over the tokens routed to it on each rank); the
            check then compares everything but the length. ``seq_len`` needs equal lengths.
        ablate_incoming_state: a diagnostic that drops the state arriving from earlier ranks
            (the results are then wrong: it shows what the exchange carries). Off by default.
        **kwargs: the op's keywords: ``scale``, ``initial_state`` (the state before the whole
            global sequence, the same on every rank), ``output_final_state``, ``backend``, and
            ``cu_seqlens`` for packed documents (see :func:`_sequence_parallel_packed`).

    Returns:
        ``(o_local, S_final)``: this rank's outputs ``[B, T_local, H, V]`` and, when
        ``output_final_state=True``, the state after the whole global sequence (the same on
        every rank), else ``None``.
    """
    spec = spec_of(op)
    check_method(method, "sequence_parallel: method")
    if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks < 1):
        raise ValueError(f"sequence_parallel: num_blocks={num_blocks!r}; pass an int >= 1 or None")
    if kwargs.get("cu_seqlens") is not None:
        return _sequence_parallel_packed(op, args, kwargs, group, method, num_blocks, seq_len,
                                         check, timer, ablate_incoming_state)
    call = _bind(op, args, kwargs)  # the op's own named errors, checked once
    T, V = call.q.shape[1], call.v.shape[-1]

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "sequence_parallel: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group (torchrun does this via lsp.launch) first"
        )
    P = dist.get_world_size(group)
    if seq_len is not None and seq_len != P * T:
        raise ValueError(
            f"sequence_parallel: seq_len={seq_len} does not match {P} ranks x {T} local tokens "
            f"= {P * T}; shard the sequence into {P} equal contiguous parts "
            f"(seq_len must be divisible by {P})"
        )
    if not equal_lengths and seq_len is not None:
        raise ValueError("sequence_parallel: seq_len=... assumes equal shards; pass "
                         "equal_lengths=True or no seq_len")
    if check:
        meta = CallMeta.of(call, method, num_blocks)
        if not equal_lengths:
            meta = dataclasses.replace(meta, T_local=-1)
        _check_consistency(group, meta, call.q.device)

    if _kernels_take_boundary(call):
        return _op_on_kernels(call, group, method, num_blocks, timer, ablate_incoming_state)

    local = pairs.local_pass(spec, call)
    A, B = local.pair()
    ready = None
    if B.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    o0, qe = local.outputs()

    sd = call.state_dtype
    S_init = None if call.initial_state is None else call.initial_state.to(sd)
    exchange = _exchange_for(call, call.transition, group, method, call.output_final_state,
                             num_blocks)
    S_start, S_final = _StateScan.apply(A, B.contiguous(), S_init, exchange, ready, timer)
    if ablate_incoming_state:
        S_start = torch.zeros_like(S_start)

    # o_t += qe_t @ S_start, per head: [T, K] @ [K, V]
    corr = torch.einsum("bthk,bhkv->bthv", qe.to(sd), S_start)
    o = (o0.to(sd) + corr).to(o0.dtype)
    return o, (S_final if call.output_final_state else None)


# Both families on the Triton kernels run the exchange inside the op (:class:`_KernelBoundary`);
# False: the pairs of ``parallel/pairs.py`` for every backend (the A/B of
# ``launch/check_sp_kernels.py``).
EXCHANGE_IN_KERNELS = True


def _kernels_take_boundary(call: OpCall) -> bool:
    """The op runs on the Triton kernels, which take the exchange inside (see below)."""
    from lsp.ops import api

    return (EXCHANGE_IN_KERNELS
            and api.resolve_backend(call.family.value, call.backend, call.q) == "triton")


class _KernelBoundary:
    """The state exchange as the kernels' ``boundary`` (``lsp.kernels.delta_rule`` and
    ``linear_attention``).

    The delta rule's pair needs the full ``[K, K]`` transition of the slice. The torch path
    gets it by running the op at value width ``V + K`` (``pairs.delta_rule_local``), and
    corrects linear attention's zero-start outputs with effective queries
    (``pairs.linear_attention_local``). On the Triton kernels the in-GPU segment split already
    computes every segment's pair, so the op folds them into the slice's pair, calls
    :meth:`forward` between its pair pass and its output pass, and :meth:`backward` between its
    local reverse pass and its per-chunk gradients. The extra cost over the one-GPU op is the
    fold and the exchange itself (no overlap with local work: the outputs need the incoming
    state).
    """

    def __init__(self, exchange, timer: ExchangeTimer | None, ablate: bool):
        self.exchange, self.timer, self.ablate = exchange, timer, ablate
        self.first = exchange.g.rank == 0

    def forward(self, A: Tensor | None, B: Tensor, S_init: Tensor | None):
        if A is None and self.exchange.kind == Transition.SCALAR:  # packed: resets elsewhere
            A = B.new_ones(B.shape[:2])
        S_start, S_final = _timed(self.timer, lambda: self.exchange.forward(A, B, S_init),
                                  B.device)
        if self.ablate:
            S_start = torch.zeros_like(S_start)
        return S_start, S_final

    def backward(self, G: Tensor, dS_final: Tensor | None) -> Tensor:
        ex = self.exchange
        if dS_final is None and ex.need_final:
            dS_final = torch.zeros_like(G)
        if self.ablate:  # the outputs did not see the incoming state: nothing flows back to it
            G = torch.zeros_like(G)
        return _timed(self.timer, lambda: ex.backward(G, dS_final), G.device)


def _kernel_call(call: OpCall, boundary: _KernelBoundary, initial_state, output_final_state):
    """This rank's op on the Triton kernels with the exchange inside."""
    from lsp import kernels

    extra = (call.beta,) if call.family == Family.DELTA_RULE else ()
    return getattr(kernels, call.family.value)(
        call.q, call.k, call.v, *extra, call.g, scale=call.scale, initial_state=initial_state,
        output_final_state=output_final_state, boundary=boundary)


def _exchange_for(call: OpCall, kind: Transition, group, method: str, need_final: bool,
                  num_blocks: int | None):
    """The exchange object of this call's states (``[B, H, K, V]`` in its state dtype)."""
    B_, _, H, K = call.q.shape
    V = call.v.shape[-1]
    return make_exchange(method, kind, group, need_final, num_blocks,
                         state_bytes=B_ * H * K * V * torch.finfo(call.state_dtype).bits // 8,
                         V=V)


def _op_on_kernels(call: OpCall, group, method: str, num_blocks: int | None,
                   timer: ExchangeTimer | None, ablate: bool):
    """One op call on this rank's slice with the exchange inside (:class:`_KernelBoundary`)."""
    exchange = _exchange_for(call, call.transition, group, method, call.output_final_state,
                             num_blocks)
    return _kernel_call(call, _KernelBoundary(exchange, timer, ablate), call.initial_state,
                        call.output_final_state)


def _require_dist() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "sequence_parallel: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group (torchrun does this via lsp.launch) first"
        )


def _zero_transition(kind: Transition, B: Tensor) -> Tensor:
    """``A = 0`` of a transition kind, for a state ``B [1, H, K, V]``."""
    b, H, K = B.shape[:3]
    shape = {Transition.SCALAR: (b, H), Transition.DIAGONAL: (b, H, K),
             Transition.FULL: (b, H, K, K)}[kind]
    return B.new_zeros(shape)


def _sequence_parallel_packed(op, args, kwargs, group, method, num_blocks, seq_len, check,
                              timer, ablate_incoming_state):
    """``sequence_parallel`` with packed documents (``cu_seqlens``; see ``parallel/packed.py``).

    Every rank passes the GLOBAL offsets ``[N+1]`` and the initial states of all ``N``
    documents ``[N, H, K, V]`` (or none). A boundary inside a shard resets the state there:
    the shard's transition is zero and its effective queries after the boundary are zero; a
    document that spans ranks chains through the exchange as an unpacked sequence does.

    Returns this rank's outputs and, when asked, the final states ``[N, H, K, V]``, the same on
    every rank. Each document's final state is known only on the rank where it ends (it needs
    that rank's incoming state), so they are summed over the group in one all-reduce of
    ``[N, H, K, V]``, which replaces the chains' broadcast of the final state (the all-gather
    method has no such broadcast: there it is one more collective). Gradients of the initial
    states arrive on the rank where each document starts (the first document's on rank 0): their
    sum over the ranks is the gradient.
    """
    kwargs = dict(kwargs)
    cu = kwargs.pop("cu_seqlens")
    h0 = kwargs.pop("initial_state", None)
    want_final = kwargs.get("output_final_state", False)
    spec = spec_of(op)
    name = f"sequence_parallel: {spec.family.value}"
    call = _bind(op, args, kwargs)  # the op's own checks of the shard
    T = call.q.shape[1]
    # the op's packed checks of this shard (a batch of 1; a backend that can run here)
    _bind(op, args, dict(kwargs, cu_seqlens=torch.tensor([0, T])))
    _require_dist()
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    if seq_len is not None and seq_len != P * T:
        raise ValueError(
            f"sequence_parallel: seq_len={seq_len} does not match {P} ranks x {T} local tokens "
            f"= {P * T}; shard the sequence into {P} equal contiguous parts"
        )
    offsets = packed.check_offsets(name, cu, P * T, what=f"the global sequence ({P} ranks x {T})")
    N = len(offsets) - 1
    _, _, H, K = call.q.shape
    V = call.v.shape[-1]
    packed.check_document_states(name, h0, N, H, K, V, call.q.device)
    call = call.replace(output_final_state=False)
    if check:
        meta = CallMeta.of(call.replace(initial_state=h0, output_final_state=want_final),
                           method, num_blocks, packed=(N, packed.offsets_digest(offsets)))
        _check_consistency(group, meta, call.q.device)

    plan = packed.plan_shard(offsets, rank, T)
    kind = call.transition
    if kind == Transition.IDENTITY:  # a reset needs a transition that can be zero
        kind = Transition.SCALAR
    sd = call.state_dtype

    def part(x, sl):
        return None if x is None else x[:, sl]

    def shard_call(sl, **changes):
        return call.replace(q=part(call.q, sl), k=part(call.k, sl), v=part(call.v, sl),
                            beta=part(call.beta, sl), g=part(call.g, sl), **changes)

    S_init = None if h0 is None else h0[:1].to(sd)

    def scan(A, B):
        """The exchange of this rank's pair; returns the state at the shard start."""
        exchange = _exchange_for(call, kind, group, method, False, num_blocks)
        ready = None
        if B.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        S_start, _ = _StateScan.apply(A, B.contiguous(), S_init, exchange, ready, timer)
        return torch.zeros_like(S_start) if ablate_incoming_state else S_start

    if not plan.resets and _kernels_take_boundary(call):
        # the whole shard continues one document: the unpacked case, with the exchange inside
        # the op; the op returns the document's final state where it ends at the shard's end
        own_end = want_final and bool(plan.ends)
        o, S_stretch = _kernel_call(
            call, _KernelBoundary(_exchange_for(call, kind, group, method, False, num_blocks),
                                  timer, ablate_incoming_state), S_init, own_end)
    elif plan.resets:
        # nothing of the incoming state survives the shard: its pair is (0, the last document's
        # end state), known before the stretch runs; the stretch then runs from the state the
        # exchange delivers, as an op call with that initial state (no pairs of pairs.py)
        docs = torch.tensor(plan.rest_docs, device=call.q.device)
        o_rest, S_rest = spec.run(shard_call(
            slice(plan.stretch, T), initial_state=None if h0 is None else h0[docs],
            output_final_state=True,
            cu_seqlens=torch.tensor(plan.rest_offsets, device=call.q.device)))
        B = S_rest[-1:].to(sd)
        S_start = scan(_zero_transition(kind, B), B)
        if plan.stretch:
            o_stretch, S_stretch = spec.run(shard_call(slice(0, plan.stretch),
                                                       initial_state=S_start,
                                                       output_final_state=True))
            o = torch.cat([o_stretch, o_rest], dim=1)
        else:  # every rank's outputs depend on S_start, so that its backward joins the scan
            o = o_rest + (S_start.sum() * 0).to(o_rest.dtype)
            S_stretch = None
    else:  # the whole shard continues one document: its pair and effective queries
        local = pairs.local_pass(spec, shard_call(slice(0, T), initial_state=None))
        A, B = local.pair()
        if A is None:
            A = torch.ones(B.shape[:2], dtype=B.dtype, device=B.device)
        o0, qe = local.outputs()
        S_start = scan(A, B)
        # o_t += qe_t @ S_start, per head
        o = (o0.to(sd) + torch.einsum("bthk,bhkv->bthv", qe.to(sd), S_start)).to(o0.dtype)
        S_stretch = pairs.apply(kind, A, S_start) + B if want_final else None
    if not want_final:
        return o, None
    # each document's final state on the rank where it ends, summed over the group
    finals, idx = [], []
    for d, src in plan.ends:
        finals.append(S_stretch.to(sd) if src < 0 else S_rest[src:src + 1].to(sd))
        idx.append(d)
    table = torch.zeros((N, H, K, V), dtype=sd, device=call.q.device)
    if finals:
        table = table.index_copy(0, torch.tensor(idx, device=table.device), torch.cat(finals))
    return o, _DocumentStates.apply(table, o, group)


class _DocumentStates(torch.autograd.Function):
    """Sum of the ranks' final-state tables; adjoint: the sum of the ranks' cotangents.

    The shard's outputs ``o`` are an input (gradient zero): they depend on the incoming state
    on every rank, so the backward of this all-reduce runs before the reverse scan (``o``'s own
    backward leads to it), in the same order everywhere.
    """

    @staticmethod
    def forward(ctx, table, o, group):
        ctx.group = group
        out = table.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # a replicated output: sum of its gradients
        return grad, None, None
