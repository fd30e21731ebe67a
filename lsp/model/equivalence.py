"""Layout equivalence: tiny models of every mixer kind run under a parallel layout and compared,
loss and every gradient shard, with the one-process run.

Used by ``tests/model/test_model_layouts.py`` (gloo, CPU) and by ``python -m lsp.launch.check_gpu``
(NCCL, GPUs). The flow on every rank: :func:`train_step` builds a case's model under the
topology, runs forward and backward on this rank's shard of a fixed batch and reduces the
gradients; :func:`snapshot` keeps the one-process results; :func:`compare` returns one row per
check.
"""

from __future__ import annotations

import torch

__all__ = ["TOL", "SEED", "METHODS", "BASE", "CASES", "LAYOUTS", "batch", "rel_err",
           "train_step", "snapshot", "compare", "global_name"]

TOL = 1e-5
SEED = 7
BATCH, SEQ = 2, 24  # SEQ divisible by 2, 3 and 2*2 (TP2xCP2 gives 6 tokens per rank)
METHODS = ("allgather", "allscan", "ring")

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


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 (``||x - ref||`` when ``ref`` is zero)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


def train_step(case: str, topo, method: str = "allscan", backend: str = "torch", device=None):
    """Build the case's model under ``topo``, run forward and backward on this rank's shard of
    the fixed batch, reduce gradients; returns ``(model, total global loss)``."""
    from lsp.layers import ParallelContext
    from lsp.model import DecoderLM, ModelConfig, split_batch
    from lsp.parallel.grads import reduce_gradients

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
    from lsp.layers.init import shard_of

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
