"""Bad configurations raise ValueError naming the value and the fix, before any collective.

These run in the pytest process, where no process group exists: a collective attempted before
the check would fail with a different error, so the messages below prove the order.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lsp.layers import DeltaNet, MoEFFN, ParallelContext, SoftmaxAttention
from lsp.model import DecoderLM, ModelConfig, split_batch

SMALL = dict(vocab_size=64, hidden_size=32, num_heads=4, head_dim=8, ffn_hidden_size=64)


def ctx_for(tp=1, cp=1, ep=1, dp=1, **kw):
    """A layout with sizes only (no process groups): enough for every check."""
    return ParallelContext(SimpleNamespace(tp=tp, cp=cp, ep=ep, dp=dp), backend="torch", **kw)


@pytest.fixture(autouse=True)
def no_process_group():
    assert not dist.is_initialized()
    yield
    assert not dist.is_initialized()


def test_heads_not_divisible_by_tp():
    cfg = ModelConfig(**{**SMALL, "num_heads": 3}, pattern="G")
    with pytest.raises(ValueError, match=r"num_heads=3 is not divisible by the tensor-parallel size tp=2.*choose tp dividing 3"):
        DecoderLM(cfg, ctx_for(tp=2))
    with pytest.raises(ValueError, match=r"num_heads=6 is not divisible by the tensor-parallel size tp=4"):
        DeltaNet(32, 6, 8, ctx=ctx_for(tp=4))
    with pytest.raises(ValueError, match=r"num_kv_heads=2 is not divisible by the tensor-parallel size tp=4"):
        ModelConfig(**SMALL, pattern="S", num_kv_heads=2).check_layout(tp=4)
    with pytest.raises(ValueError, match=r"num_kv_heads=1 is not divisible by the tensor-parallel size tp=2"):
        SoftmaxAttention(32, 4, 8, num_kv_heads=1, ctx=ctx_for(tp=2))


def test_experts_not_divisible_by_ep():
    cfg = ModelConfig(**SMALL, pattern="GS", num_experts=6)
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the expert-parallel size ep=4"):
        DecoderLM(cfg, ctx_for(ep=4, dp=4))
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the expert-parallel size ep=4"):
        MoEFFN(32, 6, 2, 64, ctx_for(ep=4))
    with pytest.raises(ValueError, match="MoEFFN needs a topology"):
        MoEFFN(32, 4, 2, 64, ParallelContext())


def test_sequence_length_not_divisible_by_cp():
    cfg = ModelConfig(**SMALL, pattern="G")
    ids = torch.zeros(2, 25, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence length 25 is not divisible by cp\*tp = 2\*1 = 2"):
        split_batch(ids, ctx_for(cp=2), cfg)
    with pytest.raises(ValueError, match=r"sequence length 30 is not divisible by cp\*tp = 2\*2 = 4"):
        cfg.check_layout(tp=2, cp=2, seq_length=30)
    with pytest.raises(ValueError, match=r"gives 2 tokens per rank, fewer than the 3"):
        cfg.check_layout(cp=4, seq_length=8)
    with pytest.raises(ValueError, match=r"batch size 3 is not divisible by the data-parallel size dp=2"):
        split_batch(torch.zeros(3, 8, dtype=torch.long), ctx_for(dp=2), cfg)
    model = DecoderLM(cfg, ParallelContext(backend="torch"))
    model.ctx = ctx_for(tp=2)  # a rank whose shard cannot split over TP fails before any gather
    with pytest.raises(ValueError, match=r"this rank holds 5 tokens, not divisible by tp=2"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_unknown_pattern_letter():
    with pytest.raises(ValueError, match=r"unknown mixer letter 'X' at position 1 of pattern 'GXS'; "
                                         r"use one of L=LinearAttention, D=DeltaNet"):
        ModelConfig(**SMALL, pattern="GXS")
    with pytest.raises(ValueError, match=r"unknown FFN letter 'Z' at position 0"):
        ModelConfig(**SMALL, pattern="G", ffn_pattern="Z")
    with pytest.raises(ValueError, match=r"has 1 letters but pattern 'GG' has 2"):
        ModelConfig(**SMALL, pattern="GG", ffn_pattern="F")
    with pytest.raises(ValueError, match=r"asks for MoE layers but num_experts=0"):
        ModelConfig(**SMALL, pattern="G", ffn_pattern="E")
    with pytest.raises(ValueError, match="pattern is empty"):
        ModelConfig(**SMALL, pattern="")


def test_other_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"sp_method='zigzag' is unknown; choose one of"):
        ParallelContext(sp_method="zigzag")
    with pytest.raises(ValueError, match=r"vocab_size=63 is not divisible by tp=2"):
        ModelConfig(**{**SMALL, "vocab_size": 63}, pattern="G").check_layout(tp=2)
    with pytest.raises(ValueError, match=r"la_decay='slow'"):
        ModelConfig(**SMALL, pattern="L", la_decay="slow")
    with pytest.raises(ValueError, match=r"mom_topk=5 must lie in \[1, mom_num_memories=4\]"):
        ModelConfig(**SMALL, pattern="M", mom_topk=5)
    with pytest.raises(ValueError, match=r"moe_topk=3 must lie in \[1, num_experts=2\]"):
        ModelConfig(**SMALL, pattern="G", num_experts=2, moe_topk=3)
    with pytest.raises(ValueError, match=r"unknown model config keys \['heads'\]"):
        ModelConfig.from_dict({"heads": 4})
