"""Work done on each simulated rank by tests/test_sequence_parallel_varlen.py.

Every rank draws the same packed sequence (B = 1, global offsets, per-document initial states),
computes the one-process packed op in float64 on the whole sequence as the reference, runs
``sequence_parallel`` with the GLOBAL ``cu_seqlens`` on its own shard, and reports the relative
errors of its outputs, the per-document final states and every gradient. The initial states'
gradient arrives on the rank where each document starts: the ranks' gradients are summed (one
all-reduce, test side) before the comparison.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from lsp.testing import FAMILIES, GATES, make_inputs, rel_err

import lsp
from lsp.parallel import METHODS, sequence_parallel

OPS = {"linear_attention": lsp.ops.linear_attention, "delta_rule": lsp.ops.delta_rule}
DTYPES = {"f64": torch.float64, "f32": torch.float32}
H, K, V = 2, 4, 3


def layouts(P: int, Tl: int) -> dict[str, list[int]]:
    """Document offsets over ``P * Tl`` tokens (``Tl >= 6``)."""
    T = P * Tl
    inner = sorted({0, T} | {r * Tl + d for r in range(P) for d in (2, Tl - 1)})
    tiny = sorted(set(range(0, T, 1 if T <= 32 else 2)) - {Tl + 1} | {T})
    return {
        "rank_edges": [r * Tl for r in range(P + 1)],  # every boundary on a rank edge
        "inside": inner,  # boundaries inside every shard, one-token documents at rank edges
        "long": [0, 3, T - 2, T] if T - 2 > 3 else [0, T],  # a document longer than a shard
        "tiny": tiny,  # many one-token documents, one of two tokens across a rank edge
        "whole": [0, T],  # one document over every rank
    }


def configs():
    return [dict(family=f, gate=g, method=m, dtype=d)
            for f, g, m, d in itertools.product(FAMILIES, GATES, METHODS, DTYPES)]


def config_id(c) -> str:
    return f"{c['family']}-{c['gate']}-{c['method']}-{c['dtype']}"


def _pos(family, a):
    return [a["q"], a["k"], a["v"]] + ([a["beta"]] if family == "delta_rule" else []) + [a.get("g")]


def packed_errors(rank: int, P: int, c: dict, offsets: list[int], Tl: int, with_state: bool,
                  seed: int = 0, backend: str = "torch") -> dict:
    family, dtype = c["family"], DTYPES[c["dtype"]]
    T, N = P * Tl, len(offsets) - 1
    full = make_inputs(family, c["gate"], 1, T, H, K, V, dtype=torch.float64, with_state=False,
                       seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if with_state:
        full["initial_state"] = torch.randn(N, H, K, V, generator=gen,
                                            dtype=torch.float64).requires_grad_()
    cu = torch.tensor(offsets, dtype=torch.int32)
    do = torch.randn(1, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64)
    w = torch.arange(1, P + 1, dtype=torch.float64)
    w = w / w.sum()  # each rank's share of the final states' cotangent

    # the one-process packed op in float64 (itself checked against the per-document
    # token-by-token oracle in tests/test_ops_varlen.py)
    o_ref, S_ref = OPS[family](*_pos(family, full), initial_state=full.get("initial_state"),
                               output_final_state=True, cu_seqlens=cu, backend="torch")
    names = list(full)
    ref = dict(zip(names, torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(),
                                              [full[n] for n in names])))

    sl = slice(rank * Tl, (rank + 1) * Tl)
    shard = {n: t.detach()[:, sl].to(dtype).requires_grad_()
             for n, t in full.items() if n != "initial_state"}
    h0 = full.get("initial_state")
    if h0 is not None:
        h0 = h0.detach().to(dtype).requires_grad_()
    o, S = sequence_parallel(OPS[family], *_pos(family, shard), method=c["method"],
                             num_blocks=2 if c["method"] == "allscan" else None,
                             initial_state=h0, output_final_state=True, backend=backend,
                             cu_seqlens=cu, seq_len=T)
    assert o.shape == (1, Tl, H, V) and o.dtype == dtype and S.shape == (N, H, K, V)
    loss = (o * do[:, sl].to(dtype)).sum() + w[rank].item() * (S * dS.to(S.dtype)).sum()
    leaves = dict(shard, **({} if h0 is None else {"initial_state": h0}))
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    errs = {"o": rel_err(o, o_ref[:, sl]), "S": rel_err(S, S_ref)}
    for n, gr in grads.items():
        if n == "initial_state":
            total = gr.detach().double().clone()
            dist.all_reduce(total)
            errs["dinit"] = rel_err(total, ref[n])
        else:
            errs["d" + n] = rel_err(gr, ref[n][:, sl])
    return errs


def run_packed(rank: int, P: int, plan: list[tuple[dict, list[str]]], Tl: int) -> dict:
    """``plan``: (configuration, layout names); results keyed ``config-layout``."""
    out = {}
    all_layouts = layouts(P, Tl)
    for c, which in plan:
        for name in which:
            with_state = name != "rank_edges" or c["dtype"] == "f32"
            out[f"{config_id(c)}-{name}"] = packed_errors(rank, P, c, all_layouts[name], Tl,
                                                          with_state)
    return out


def run_packed_errors(rank: int, P: int) -> dict:
    """Bad global offsets raise the same named ValueError on every rank before any collective."""
    op = lsp.ops.linear_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2, 3, generator=gen) for _ in range(3))
    out = {}
    for name, kw in {
        "local_end": dict(cu_seqlens=torch.tensor([0, 4])),
        "not_increasing": dict(cu_seqlens=torch.tensor([0, 3, 3, 4 * P])),
        "state_shape": dict(cu_seqlens=torch.tensor([0, 1, 4 * P]),
                            initial_state=torch.zeros(1, 2, 3, 3)),
        "offsets_differ": dict(cu_seqlens=torch.tensor([0, 1 + rank, 4 * P])),
    }.items():
        try:
            sequence_parallel(op, q, k, v, backend="torch", **kw)
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def run_leak_check(rank: int, P: int) -> dict:
    """How far the packed SP outputs are from the one-document SP outputs (must be far)."""
    Tl = 6
    a = make_inputs("linear_attention", "head", 1, P * Tl, H, K, V, with_state=False)
    sl = slice(rank * Tl, (rank + 1) * Tl)
    args = [a[n].detach()[:, sl] for n in ("q", "k", "v", "g")]
    cu = torch.tensor([0, 2] + [r * Tl + 3 for r in range(1, P)] + [P * Tl])
    o_p, _ = sequence_parallel(lsp.ops.linear_attention, *args, cu_seqlens=cu, backend="torch")
    o_w, _ = sequence_parallel(lsp.ops.linear_attention, *args, backend="torch")
    return {"packed_vs_whole": rel_err(o_p[:, 2:], o_w[:, 2:])}


def run_packed_and_checks(rank: int, P: int, plan, Tl: int) -> dict:
    """One group of ranks for the packed matrix, the named errors and the leak guard."""
    return {"packed": run_packed(rank, P, plan, Tl), "errors": run_packed_errors(rank, P),
            "leak": run_leak_check(rank, P)}


def run_packed_on_kernels(rank: int, P: int, Tl: int, only: str | None = None) -> dict:
    """The packed matrix's ``long``, ``whole`` and ``inside`` layouts (``only``: one of them)
    with ``backend="triton"`` on the Triton interpreter (``lsp.testing.kernels_on_cpu``): a
    stretch beside a boundary runs the dense kernels from the arriving state, the documents
    starting inside a shard one packed kernel call, a shard inside one document the exchange
    inside the op. Each result counts the passes of ``parallel/pairs.py`` it took."""
    from lsp.parallel import pairs
    from lsp.testing import kernels_on_cpu

    kernels_on_cpu()
    wide = pairs.delta_rule_local
    closed = pairs.linear_attention_local
    calls = []

    def counted(spec, call):  # the pairs of parallel/pairs.py, counted
        calls.append(call.q.shape[1])
        return (wide if call.beta is not None else closed)(spec, call)
    pairs.delta_rule_local = pairs.linear_attention_local = counted
    out = {}
    # "whole": one document over every rank, so no shard has a boundary inside and the op runs
    # its exchange inside (no pairs of parallel/pairs.py); "long": stretches beside resets
    for family, gate, name in (("delta_rule", "head", "long"), ("delta_rule", "key", "whole"),
                               ("linear_attention", "key", "inside"),
                               ("linear_attention", "none", "whole")):
        c = dict(family=family, gate=gate, method="allscan", dtype="f32")
        if only is not None and name != only:
            continue
        del calls[:]
        errs = packed_errors(rank, P, c, layouts(P, Tl)[name], Tl, True, backend="triton")
        out[f"{config_id(c)}-{name}"] = dict(errs, wide_passes=float(len(calls)))
    return out
