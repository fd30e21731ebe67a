"""Work done on each simulated rank by test_sequence_parallel.py (the ranks run_ranks starts).

Every rank draws the same full-sequence inputs, runs the single-process op on the whole sequence
in float64 as the reference, runs ``sequence_parallel`` on its own contiguous shard, and reports
the relative errors of its outputs, the final state and every gradient.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

import lsp
from lsp.parallel import METHODS, sequence_parallel
from lsp.testing import FAMILIES, GATES, make_inputs, op_args, rel_err

OPS = {"linear_attention": lsp.ops.linear_attention, "delta_rule": lsp.ops.delta_rule}
DTYPES = {"f64": torch.float64, "f32": torch.float32}
B, H, K, V = 2, 2, 6, 5


def configs():
    """Every family x gate x method x (initial state or not) x dtype."""
    return [dict(family=f, gate=g, method=m, with_state=s, dtype=d)
            for f, g, m, s, d in itertools.product(FAMILIES, GATES, METHODS, (False, True),
                                                   DTYPES)]


def config_id(c) -> str:
    return f"{c['family']}-{c['gate']}-{c['method']}-{'init' if c['with_state'] else 'zero'}-{c['dtype']}"


def shard_errors(rank: int, P: int, c: dict, group=None, T_local: int | None = None,
                 num_blocks: int | None = None, seed: int = 0, backend: str = "torch") -> dict:
    """Relative errors of this rank's SP results against the one-process float64 reference."""
    family, dtype = c["family"], DTYPES[c["dtype"]]
    # shard lengths that are not multiples of the 64-token chunk: 67 spans two chunks
    Tl = T_local or (67 if c["dtype"] == "f64" else 19)
    full = make_inputs(family, c["gate"], B, P * Tl, H, K, V, dtype=torch.float64,
                       with_state=c["with_state"], seed=seed)
    op = OPS[family]
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, P * Tl, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    # each rank's share of the final state's cotangent; the shares sum to dS
    w = torch.arange(1, P + 1, dtype=torch.float64)
    w = w / w.sum()

    o_ref, S_ref = op(*op_args(full), initial_state=full.get("initial_state"),
                      output_final_state=True, backend="torch")
    loss = (o_ref * do).sum() + (S_ref * dS).sum()
    names = list(full)
    ref_grads = dict(zip(names, torch.autograd.grad(loss, [full[n] for n in names])))

    sl = slice(rank * Tl, (rank + 1) * Tl)
    shard = {n: t.detach()[:, sl].to(dtype).requires_grad_()
             for n, t in full.items() if n != "initial_state"}
    init = full.get("initial_state")
    if init is not None:
        init = init.detach().to(dtype).requires_grad_()
    o, S = sequence_parallel(op, *op_args(shard), group=group, method=c["method"],
                             num_blocks=num_blocks, initial_state=init,
                             output_final_state=True, backend=backend, seq_len=P * Tl)
    assert o.dtype == dtype and o.shape == (B, Tl, H, V)
    assert S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss = (o * do[:, sl].to(dtype)).sum() + w[rank].item() * (S * dS.to(S.dtype)).sum()
    leaves = dict(shard, **({} if init is None else {"initial_state": init}))
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    errs = {"o": rel_err(o, o_ref[:, sl]), "S": rel_err(S, S_ref)}
    for n, gr in grads.items():
        if n == "initial_state":
            # returned whole on the first rank, zeros on the others (the sum is the gradient)
            ref = ref_grads[n] if rank == 0 else torch.zeros_like(ref_grads[n])
            errs["dinit"] = (rel_err(gr, ref) if rank == 0
                             else gr.norm().item() / ref_grads[n].norm().item())
        else:
            errs["d" + n] = rel_err(gr, ref_grads[n][:, sl])
    return errs


def run_configs(rank: int, P: int, cfgs: list[dict]) -> dict:
    # All-Scan in 3 uneven blocks along V=5 (the default picks 1 block for states this small;
    # the interleaved-subgroup test runs the default)
    return {config_id(c): shard_errors(rank, P, c, num_blocks=3 if c["method"] == "allscan" else None)
            for c in cfgs}


def run_on_kernels(rank: int, P: int, cfgs: list[dict], segments: list[int]) -> dict:
    """``backend="triton"`` on the Triton interpreter: the exchange runs inside the kernels' op
    (``sequence._KernelBoundary``), with the rank's slice cut into each of ``segments`` in-GPU
    segments. CPU tensors reach the kernels because the backend choice is patched on this rank
    (on GPUs ``backend="triton"`` takes this path); the pairs of ``parallel/pairs.py`` are made
    to fail, so a result proves the in-op path ran."""
    import os

    from lsp.parallel import pairs
    from lsp.testing import kernels_on_cpu

    kernels_on_cpu()

    def no_pairs(spec, call):
        raise AssertionError("the op on the kernels took the pairs of parallel/pairs.py")
    pairs.delta_rule_local = pairs.linear_attention_local = no_pairs
    out = {}
    for c in cfgs:
        for n in segments:
            os.environ["LSP_KERNELS_SEGMENTS"] = str(n)
            # 150 tokens: three 64-token chunks per rank, the last one ragged
            out[f"{config_id(c)}-seg{n}"] = shard_errors(
                rank, P, c, T_local=150, backend="triton",
                num_blocks=2 if c["method"] == "allscan" else None)
    return out


def run_interleaved_subgroups(rank: int, P: int, cfgs: list[dict]) -> dict:
    """World of 4 split into groups {0, 2} and {1, 3}: group ranks differ from global ranks."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine = groups[rank % 2]
    return {config_id(c): shard_errors(dist.get_rank(mine), 2, c, group=mine, seed=rank % 2)
            for c in cfgs}


def run_blocks(rank: int, P: int, cfgs: list[dict], blocks: list[int]) -> dict:
    """All-Scan with explicit block counts (1, uneven splits, one block per value column)."""
    return {f"{config_id(c)}-n{n}": shard_errors(rank, P, c, num_blocks=n)
            for c in cfgs for n in blocks}


def run_errors(rank: int, P: int) -> dict:
    """Mismatched calls raise the same ValueError on every rank; the group stays usable."""
    op = lsp.ops.linear_attention
    out = {}

    def shard(T, Kd=4):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(1, T, 2, Kd, generator=g) for _ in range(2)] + [
            torch.randn(1, T, 2, 3, generator=g)]

    def attempt(name, fn):
        try:
            fn()
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)

    attempt("method", lambda: sequence_parallel(op, *shard(4), method=("allscan", "ring")[rank % 2]))
    attempt("shard_length", lambda: sequence_parallel(op, *shard(4 + rank % 2), method="allgather"))
    attempt("head_dim", lambda: sequence_parallel(op, *shard(4, Kd=4 + rank % 2), method="ring"))
    attempt("dtype", lambda: sequence_parallel(
        op, *[t.to((torch.float32, torch.float64)[rank % 2]) for t in shard(4)]))
    attempt("seq_len", lambda: sequence_parallel(op, *shard(4), seq_len=4 * P + 1))
    attempt("unknown_method", lambda: sequence_parallel(op, *shard(4), method="zigzag"))
    attempt("not_an_op", lambda: sequence_parallel(torch.matmul, *shard(4)))
    attempt("bad_shard", lambda: sequence_parallel(op, *shard(4)[:2], torch.randn(1, 5, 2, 3)))
    # after all of that, a correct call still completes on every rank
    o, S = sequence_parallel(op, *shard(4), method="allscan", output_final_state=True)
    out["after"] = float(S.sum())
    return out
