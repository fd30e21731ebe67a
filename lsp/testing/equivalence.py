"""Layout equivalence: tiny models of every mixer kind run under a parallel layout and compared,
loss and every gradient shard, with the one-process run.

Used by ``tests/model/test_model_layouts.py`` (gloo, CPU, through :func:`reference_rank` and
:func:`layout_rank`) and by ``python -m lsp.launch.check_gpu`` (NCCL, GPUs). The flow on every
rank: :func:`train_step` builds a case's model under the topology, runs forward and backward on
this rank's shard of a fixed batch and reduces the gradients; :func:`reference` keeps the
one-process results of every case; :func:`layout_rows` runs every case (every SP method when
CP > 1) and :func:`compare` returns one row per check.
"""

from __future__ import annotations

import torch

# at import, not in the functions: ranks forked by lsp.testing.run_ranks inherit them instead of
# each importing megatron-core
from lsp.layers import ParallelContext
from lsp.layers.init import shard_of
from lsp.model import DecoderLM, ModelConfig, split_batch
from lsp.parallel import METHODS
from lsp.parallel.grads import reduce_gradients
from lsp.parallel.topology import init_topology
from lsp.testing.ops import rel_err

__all__ = ["TOL", "SEED", "METHODS", "BASE", "CASES", "LAYOUTS", "batch", "train_step",
           "snapshot", "reference", "compare", "layout_rows", "global_name", "reference_rank",
           "layout_rank"]

TOL = 1e-5
SEED = 7
BATCH, SEQ = 2, 24  # SEQ divisible by 2, 3 and 2*2 (TP2xCP2 gives 6 tokens per rank)

BASE = dict(vocab_size=64, hidden_size=32, num_heads=4, head_dim=8, ffn_hidden_size=64,
            init_std=0.1, conv_size=4)
CASES = {
    # one model per mixer kind (no FFN; linear attention with each decay), then a hybrid with
    # MoE (shared expert, tied head)
    "L": dict(pattern="L", ffn_pattern="-", la_decay="key", use_short_conv=True),
    "L_head": dict(pattern="L", ffn_pattern="-", la_decay="head", la_feature_map="elu",
                   la_qk_norm="sum", use_short_conv=False, la_output_gate=False),
    "L_fixed": dict(pattern="L", ffn_pattern="-", la_decay="fixed", la_feature_map="relu",
                    la_qk_norm="l2", use_short_conv=False),
    "L_none": dict(pattern="L", ffn_pattern="-", la_decay="none", la_feature_map="silu"),
    "D": dict(pattern="D", ffn_pattern="-"),
    "G": dict(pattern="G", ffn_pattern="-", expand_v=2.0),
    "M": dict(pattern="M", ffn_pattern="-", mom_num_memories=3, mom_topk=2),
    "S": dict(pattern="S", ffn_pattern="-", num_kv_heads=2),
    "hybrid": dict(pattern="GMS", ffn_pattern="EFE", num_experts=4, moe_topk=2,
                   moe_shared_expert_size=32, tie_embeddings=True),
}
# name -> (world size, tp, cp, ep); DP = world / (tp * cp)
LAYOUTS = {
    "TP2": (2, 2, 1, 1),
    "CP2": (2, 1, 2, 1),
    "EP2": (2, 1, 1, 2),
    "TP2xCP2": (4, 2, 2, 1),
    "CP2xEP2": (2, 1, 2, 2),
    "CP3": (3, 1, 3, 1),
}


def batch(device=None):
    """The fixed global batch ``(ids, labels)``, ``[BATCH, SEQ]``."""
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(0, BASE["vocab_size"], (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, BASE["vocab_size"], (BATCH, SEQ), generator=gen)
    return ids.to(device), labels.to(device)


def train_step(case: str, topo, method: str = "allscan", backend: str = "torch", device=None):
    """Build the case's model under ``topo``, run forward and backward on this rank's shard of
    the fixed batch, reduce gradients; returns ``(model, total global loss)``."""
    cfg = ModelConfig(**BASE, **CASES[case])
    ctx = ParallelContext(topo, sp_method=method, backend=backend)
    model = DecoderLM(cfg, ctx, seed=SEED).to(device)
    ids, labels = batch(device)
    out = model(split_batch(ids, ctx, cfg), split_batch(labels, ctx, cfg))
    out.loss.backward()
    reduce_gradients(model, topo)
    total = out.lm_loss + (out.aux_loss if out.aux_loss is not None else 0.0)
    return model, total


def global_name(name: str, p) -> str:
    """The parameter's one-process name (experts by their global index)."""
    if hasattr(p, "lsp_expert_index"):
        local, glob = p.lsp_expert_index
        return name.replace(f"local_experts.{local}.", f"local_experts.{glob}.", 1)
    return name


def snapshot(model, total) -> dict:
    """What :func:`compare` needs from the one-process run, on the CPU."""
    return dict(
        loss=total.detach().cpu(),
        params={n: p.detach().cpu().clone() for n, p in model.named_parameters()},
        grads={n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()},
    )


def compare(case: str, method: str, model, total, ref: dict, topo) -> list[tuple]:
    """Rows ``(case, method, what, rel_err)`` for the loss, every initial weight shard
    (``param:<name>``, must be bit-identical) and every gradient shard (``grad:<name>``)."""
    tp, tp_rank = topo.tp, topo.tp_rank
    rows = [(case, method, "loss", rel_err(total, ref["loss"]))]
    seen = set()
    for name, p in model.named_parameters():
        g = global_name(name, p)
        seen.add(g)
        rows.append((case, method, "param:" + name,
                     rel_err(p, shard_of(ref["params"][g], p, tp, tp_rank))))
        rows.append((case, method, "grad:" + name,
                     rel_err(p.grad, shard_of(ref["grads"][g], p, tp, tp_rank))))
    if topo.ep == 1 and seen != set(ref["params"]):  # under EP a rank holds its experts only
        raise AssertionError(f"parameters differ from the reference: {sorted(seen ^ set(ref['params']))}")
    return rows


def reference(topo, cases=CASES, backend: str = "torch", device=None) -> dict:
    """The one-process results of ``cases`` (run under a world of size 1), by case."""
    return {case: snapshot(*train_step(case, topo, backend=backend, device=device))
            for case in cases}


def layout_rows(topo, ref: dict, cases=CASES, backend: str = "torch", device=None) -> list:
    """:func:`compare`'s rows of every case in ``cases`` under ``topo``, for every SP method when
    CP > 1 (at CP = 1 no exchange runs and the method is unused)."""
    rows = []
    for case in cases:
        for method in (METHODS if topo.cp > 1 else ("allscan",)):
            model, total = train_step(case, topo, method, backend, device)
            rows += compare(case, method, model, total, ref[case], topo)
    return rows


def reference_rank(rank, world, path):
    """The gloo entry of the one-process run (``run_ranks(reference_rank, 1, path)``): saves
    :func:`reference` to ``path``; returns the case names."""
    torch.save(reference(init_topology()), path)
    return sorted(CASES)


def layout_rank(rank, world, tp, cp, ep, path):
    """The gloo entry of one layout (``run_ranks(layout_rank, world, tp, cp, ep, path)``): this
    rank's :func:`layout_rows` against the reference saved at ``path``."""
    return layout_rows(init_topology(tp, cp, ep), torch.load(path))
