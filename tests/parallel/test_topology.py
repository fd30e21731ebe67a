"""Topology on megatron's parallel_state, the CPU shim, and megatron's DDP on gloo."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lsp.parallel import megatron_shim
from lsp.parallel.topology import check_layout, init_topology
from lsp.testing import equivalence as E
from lsp.testing import rel_err, run_ranks


def test_check_layout_sizes_and_errors():
    assert check_layout(8, tp=2, cp=2, ep=4) == 2
    assert check_layout(3, cp=3) == 1
    with pytest.raises(ValueError, match=r"world size 4 is not divisible by tp\*cp = 3\*1"):
        check_layout(4, tp=3)
    with pytest.raises(ValueError, match=r"world size 4 is not divisible by ep=3"):
        check_layout(4, ep=3)
    with pytest.raises(ValueError, match=r"cp=0: parallel sizes must be integers >= 1"):
        check_layout(4, cp=0)


def test_init_topology_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        init_topology(tp=2)


def _groups(rank, world, tp, cp, ep):
    topo = init_topology(tp, cp, ep)
    ranks = dist.get_process_group_ranks
    return dict(
        tp=ranks(topo.tp_group), cp=ranks(topo.cp_group), dp=ranks(topo.dp_group),
        ep=ranks(topo.ep_group), expt_dp=ranks(topo.expt_dp_group),
        dp_cp=ranks(topo.dp_cp_group), tp_cp=ranks(topo.tp_cp_group),
        sizes=(topo.tp, topo.cp, topo.ep, topo.dp), sp=topo.sequence_parallel,
        ranks=(topo.tp_rank, topo.cp_rank, topo.dp_rank, topo.ep_rank),
    )


def test_topology_groups_on_four_gloo_ranks():
    # TP adjacent, then CP, then DP (megatron order tp-cp-ep-dp-pp); experts: EP x EDP, ETP = 1
    g = run_ranks(_groups, 4, 2, 2, 1)
    assert [x["tp"] for x in g] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [x["cp"] for x in g] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(x["dp"] == [r] for r, x in enumerate(g))
    assert all(x["tp_cp"] == [0, 1, 2, 3] and x["sp"] for x in g)
    assert [x["ranks"][:2] for x in g] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(x["expt_dp"] == [0, 1, 2, 3] and x["ep"] == [r] for r, x in enumerate(g))
    g = run_ranks(_groups, 4, 1, 2, 2)
    assert [x["cp"] for x in g] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [x["dp"] for x in g] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [x["dp_cp"] for x in g] == [[0, 1, 2, 3]] * 4
    assert [x["ep"] for x in g] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [x["expt_dp"] for x in g] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(x["sizes"] == (1, 2, 2, 2) and not x["sp"] for x in g)


def test_shim_patches_only_what_it_documents_and_restores_it():
    import megatron.core.tensor_parallel.random as mrandom
    from megatron.core.transformer.moe import token_dispatcher

    before = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.synchronize,
              token_dispatcher.maybe_move_tensor_to_cpu, mrandom._CUDA_RNG_STATE_TRACKER)
    # active by itself only without CUDA; a gloo run forces it on a GPU machine
    assert megatron_shim.install() == (not torch.cuda.is_available())
    assert megatron_shim.install(force=True) and megatron_shim.is_installed()
    try:
        assert torch.cuda.current_device() == torch.device("cpu")
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            s.wait_stream(torch.cuda.current_stream())
            s.record_event().synchronize()
        torch.cuda.synchronize()
        assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
        # split sizes of the all-to-all dispatcher become host arrays, as megatron does on GPU
        assert token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True).tolist() == [1, 2]
        # the RNG tracker forks named CPU streams and restores the default one
        tracker = mrandom.get_cuda_rng_tracker()
        tracker.add("model-parallel-rng", 1234)
        torch.manual_seed(0)
        outer = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(3)
        with tracker.fork():
            b = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), outer)
        gen = torch.Generator().manual_seed(1234)
        assert torch.equal(torch.cat([a, b]), torch.rand(6, generator=gen))
        from megatron.core.transformer.moe import moe_utils
        assert moe_utils.te_general_gemm is None  # megatron's "no TE" branch
    finally:
        megatron_shim.uninstall()
    after = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.synchronize,
             token_dispatcher.maybe_move_tensor_to_cpu, mrandom._CUDA_RNG_STATE_TRACKER)
    assert after == before and not megatron_shim.is_installed()


def _ddp_vs_reduce_gradients(rank, world, tp, cp, ep):
    """megatron's DistributedDataParallel + finalize_model_grads on gloo (through the shim)
    gives the same gradients as lsp.parallel.grads.reduce_gradients (scaled: DDP averages)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from lsp.layers import ParallelContext
    from lsp.layers.ffn import transformer_config
    from lsp.model import DecoderLM, ModelConfig, split_batch

    topo = init_topology(tp, cp, ep)
    model, _ = E.train_step("hybrid", topo)
    cfg = ModelConfig(**E.BASE, **E.CASES["hybrid"])
    ctx = ParallelContext(topo, backend="torch")
    inner = DecoderLM(cfg, ctx, seed=E.SEED)
    tcfg = transformer_config(ctx, cfg.hidden_size, cfg.ffn_hidden_size, num_experts=cfg.num_experts)
    ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  inner, pg_collection=topo.pg_collection)
    ids, labels = E.batch()
    ddp(split_batch(ids, ctx), split_batch(labels, ctx)).loss.backward()
    finalize_model_grads([ddp], pg_collection=topo.pg_collection)
    scale = topo.dp * topo.cp
    return max(rel_err(p2.main_grad * scale, p1.grad)
               for p1, p2 in zip(model.parameters(), inner.parameters()))


@pytest.mark.parametrize("layout", ["TP2xCP2", "CP2xEP2"])
def test_megatron_ddp_runs_on_gloo_and_matches(layout):
    world, tp, cp, ep = E.LAYOUTS[layout]
    errors = run_ranks(_ddp_vs_reduce_gradients, world, tp, cp, ep)
    assert max(errors) <= 1e-6, errors
