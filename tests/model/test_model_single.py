"""The decoder in one process (no process group): structure from the pattern string, loss
plumbing, tied head, seeded initialisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsp.layers import (
    DeltaNet,
    DenseFFN,
    GatedDeltaNet,
    LinearAttention,
    MixtureOfMemories,
    ParallelContext,
    SoftmaxAttention,
)
from lsp.model import DecoderLM, ModelConfig

SMALL = dict(vocab_size=64, hidden_size=32, num_heads=4, head_dim=8, ffn_hidden_size=64)
CTX = ParallelContext(backend="torch")


def _batch(B=2, T=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 64, (B, T), generator=gen), torch.randint(0, 64, (B, T), generator=gen))


def test_layers_follow_the_pattern_string():
    model = DecoderLM(ModelConfig(**SMALL, pattern="LDGMS", ffn_pattern="F-F-F"), CTX)
    kinds = [type(b.mixer) for b in model.blocks]
    assert kinds == [LinearAttention, DeltaNet, GatedDeltaNet, MixtureOfMemories, SoftmaxAttention]
    assert [type(b.ffn) if b.ffn is not None else None for b in model.blocks] == \
        [DenseFFN, None, DenseFFN, None, DenseFFN]


def test_loss_is_the_token_mean_cross_entropy_plus_aux_losses():
    model = DecoderLM(ModelConfig(**SMALL, pattern="GM", init_std=0.1), CTX)
    ids, labels = _batch()
    logits = model(ids).logits  # [T, B, V]
    ce = F.cross_entropy(logits.reshape(-1, 64), labels.t().reshape(-1))
    out = model(ids, labels)
    assert torch.allclose(out.lm_loss, ce, rtol=1e-6)
    assert out.aux_loss is not None and out.aux_loss > 0  # the MoM layer's balancing loss
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss, rtol=1e-6)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    mask = torch.zeros_like(ids)
    mask[:, 3:7] = 1
    masked = model(ids, labels, loss_mask=mask).lm_loss
    per = F.cross_entropy(logits.reshape(-1, 64), labels.t().reshape(-1), reduction="none")
    assert torch.allclose(masked, (per * mask.t().reshape(-1)).sum() / mask.sum(), rtol=1e-6)


def test_tied_head_shares_the_embedding():
    tied = DecoderLM(ModelConfig(**SMALL, pattern="G", tie_embeddings=True), CTX)
    assert tied.output is None and tied.output_weight() is tied.embedding.weight
    untied = DecoderLM(ModelConfig(**SMALL, pattern="G"), CTX)
    assert untied.output_weight() is untied.output.weight
    n = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert n == 64 * 32


def test_initialisation_depends_only_on_the_seed():
    cfg = ModelConfig(**SMALL, pattern="LGS")
    a, b = DecoderLM(cfg, CTX, seed=3), DecoderLM(cfg, CTX, seed=3)
    c = DecoderLM(cfg, CTX, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.numel() > 8 and pa.std() > 0:
            assert not torch.equal(pa, pc), name
    # the fixed RetNet decays of LinearAttention(decay="fixed") are log(1 - 2^(-5-h))
    la = LinearAttention(32, 4, 8, decay="fixed", ctx=CTX)
    assert torch.allclose(la.log_decay, torch.log1p(-2.0 ** (-5.0 - torch.arange(4.0))).double())
