"""Inputs with full forgets (log-gates of ``-inf``) for tests/ops/test_gate_limits.py, importable by
ranks: the float64 per-token oracle and ``sequence_parallel`` on this rank's shard."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lsp
from lsp.testing import make_inputs, naive_for, rel_err
from lsp.parallel import METHODS, sequence_parallel

OPS = {"linear_attention": lsp.ops.linear_attention, "delta_rule": lsp.ops.delta_rule}


def forget_at(tokens, channels=None):
    """``gate_fn`` for ``make_inputs``: logsigmoid draws with ``-inf`` at ``tokens`` (every head
    and channel) and, for per-channel gates, at ``channels`` (token, channel) pairs only."""
    def gate_fn(shape, gen):
        g = F.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64))
        T = shape[1]
        g[:, [t for t in tokens if t < T]] = float("-inf")
        if channels and len(shape) == 4:
            for t, c in channels:
                if t < T:
                    g[:, t, :, c] = float("-inf")
        return g
    return gate_fn


def oracle(family, args):
    """Outputs, final state and gradients of the float64 per-token recurrence."""
    ref = {n: t.detach().double().requires_grad_() for n, t in args.items()}
    pos = [ref[n] for n in ("q", "k", "v", "beta") if n in ref]
    o, S = naive_for(family)(*pos, ref["g"], initial_state=ref.get("initial_state"),
                             output_final_state=True)
    return o, S, ref


def sp_errors(rank: int, P: int, cases: list) -> dict:
    """Relative errors of ``sequence_parallel`` (torch backend, every method) on this rank's shard
    against the float64 oracle on the whole sequence, with full forgets inside and at the start of
    shards."""
    out = {}
    Tl = 11
    for family, gate, dtype in cases:
        # -inf at the first token, at rank 1's first token, inside rank 1's and the last shard
        forgets = forget_at([0, Tl, Tl + 4, P * Tl - 3], channels=[(2, 1), (Tl + 1, 0)])
        full = make_inputs(family, gate, 2, P * Tl, 2, 4, 3, seed=3, gate_fn=forgets)
        o_ref, S_ref, ref = oracle(family, full)
        gen = torch.Generator().manual_seed(4)
        do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
        dS = torch.randn(S_ref.shape, generator=gen, dtype=torch.float64)
        ref_grads = dict(zip(ref, torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(),
                                                      list(ref.values()))))
        sl = slice(rank * Tl, (rank + 1) * Tl)
        for method in METHODS:
            shard = {n: t.detach()[:, sl].to(dtype).requires_grad_()
                     for n, t in full.items() if n != "initial_state"}
            init = full["initial_state"].detach().to(dtype).requires_grad_()
            pos = [shard[n] for n in ("q", "k", "v", "beta") if n in shard] + [shard["g"]]
            o, S = sequence_parallel(OPS[family], *pos, method=method, initial_state=init,
                                     output_final_state=True, backend="torch")
            loss = (o * do[:, sl].to(o.dtype)).sum() + (S * dS.to(S.dtype)).sum() / P
            grads = dict(zip(shard, torch.autograd.grad(loss, list(shard.values()))))
            errs = {"o": rel_err(o, o_ref[:, sl]), "S": rel_err(S, S_ref)}
            errs.update({"d" + n: rel_err(gr, ref_grads[n][:, sl]) for n, gr in grads.items()})
            errs["dg_finite"] = float(torch.isfinite(grads["g"]).all())
            out[f"{family}-{gate}-{dtype}-{method}"] = errs
    return out
