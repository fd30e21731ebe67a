"""What keeps a long-context step's memory down, each checked against an independent reference:
memory-lean norms (float64 autograd of the plain formula), MoM's checkpointed per-memory form (the
dense form, float64), no autograd history left on megatron's MoE dispatcher after a step (it kept
every block's recomputed activations alive), and the output projection's input folding into one
GEMM (a [T, 1, K] view with a stray stride made megatron's matmul run T row products)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lsp.layers import MixtureOfMemories, ParallelContext, init_parameters
from lsp.layers.common import l2norm, merge_heads
from lsp.layers.norm import rms_norm
from lsp.testing import rel_err, run_ranks


def _plain_l2norm(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _plain_rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _grads(fn, *inputs, seed=3):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y.backward(dy.to(y.dtype))
    return [y.detach().double()] + [t.grad.double() for t in inputs]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                       (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("wshape", [(32,), (4, 32)])
def test_norms_match_float64_autograd_of_the_plain_formula(dtype, tol, wshape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 32, generator=gen, dtype=torch.float64) * 3
    w = 1 + 0.1 * torch.randn(wshape, generator=gen, dtype=torch.float64)
    ref = _grads(_plain_rms_norm, x, w)
    got = _grads(lambda a, b: rms_norm(a, b, 1e-5), x.to(dtype), w.to(torch.float32 if dtype != torch.float64 else dtype))
    for r, g in zip(ref, got):
        assert rel_err(g, r) < tol
    ref = _grads(_plain_l2norm, x)
    got = _grads(l2norm, x.to(dtype))
    for r, g in zip(ref, got):
        assert rel_err(g, r) < tol


def test_norms_save_only_their_input_and_statistics():
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    x = torch.randn(256, 1, 512, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(512, requires_grad=True)
    for fn in (lambda: l2norm(x), lambda: rms_norm(x, w, 1e-5)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        # x itself (bf16) + one float32 statistic per row (+ the weight): no float32 copy of x
        assert sum(saved) <= x.numel() * 2 + 256 * 4 + 512 * 4


def test_mom_memory_checkpointing_equals_the_dense_form():
    ctx = ParallelContext(backend="torch", params_dtype=torch.float64)
    kw = dict(num_memories=3, topk=2, shared_memory=True, expand_v=2.0, ctx=ctx)
    dense = MixtureOfMemories(16, 2, 4, **kw)
    ckpt = MixtureOfMemories(16, 2, 4, memory_checkpointing=True, **kw)
    init_parameters(dense, seed=5, tp=1)
    ckpt.load_state_dict(dense.state_dict())
    x = torch.randn(13, 2, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = []
    for mod in (dense, ckpt):
        xi = x.clone().requires_grad_()
        y, aux = mod(xi)
        (y.pow(2).sum() + aux).backward()
        outs.append([y, xi.grad] + [p.grad for p in mod.parameters()])
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_output_projection_input_folds_into_one_gemm():
    o = torch.randn(1, 64, 4, 8)  # [B=1, T, h, d], as a mixer hands it to its output projection
    x = merge_heads(o)
    assert x.shape == (64, 1, 32) and torch.equal(x[:, 0], o[0].flatten(-2))
    with torch.profiler.profile() as prof:
        torch.matmul(x, torch.randn(32, 16))
    names = {e.key for e in prof.key_averages()}
    assert "aten::mm" in names and "aten::bmm" not in names


def _moe_step_rank(rank, world):
    from lsp.layers.ffn import MoEFFN
    from lsp.model import DecoderLM, ModelConfig
    from lsp.parallel.topology import destroy_topology, init_topology
    from lsp.train.recompute import apply_activation_checkpointing

    topo = init_topology(1, 1, 1)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, pattern="GS", num_heads=2, head_dim=16,
                      ffn_hidden_size=64, num_experts=4, moe_topk=2, moe_ffn_hidden_size=32)
    model = DecoderLM(cfg, ParallelContext(topo, backend="torch"))
    apply_activation_checkpointing(model)
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(0))
    model(ids, ids).loss.backward()
    held = []
    for name, mod in model.named_modules():
        objs = [(name, mod)]
        if isinstance(mod, MoEFFN):
            objs += [(name + ".token_dispatcher", mod.moe.token_dispatcher),
                     (name + ".router", mod.moe.router)]
        for oname, obj in objs:
            for attr, val in vars(obj).items():
                if torch.is_tensor(val) and not isinstance(val, torch.nn.Parameter) and (
                        val.requires_grad or val.grad_fn is not None):
                    held.append(f"{oname}.{attr}")
    destroy_topology()
    return held


def test_no_autograd_history_is_left_on_modules_after_a_checkpointed_step():
    assert run_ranks(_moe_step_rank, 1) == [[]]


@pytest.mark.parametrize("fp32_residual", [True, False])
def test_residual_stream_dtype_under_autocast(fp32_residual):
    from lsp.model import DecoderLM, ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, pattern="GG", num_heads=2, head_dim=16,
                      ffn_hidden_size=64, fp32_residual_connection=fp32_residual)
    model = DecoderLM(cfg, ParallelContext(backend="torch"))
    seen = []
    for b in model.blocks:
        b.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out[0].dtype)))
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, ids)
    want = torch.float32 if fp32_residual else torch.bfloat16
    assert seen == [(want, want)] * 2
    assert torch.isfinite(out.loss)


def _tiny_moe_model_cfg(**kw):
    from lsp.model import ModelConfig

    return ModelConfig(vocab_size=64, hidden_size=32, num_heads=2, head_dim=16,
                       ffn_hidden_size=64, num_experts=4, moe_topk=2, moe_ffn_hidden_size=32,
                       **kw)


def _grads_without_and_with(world, cfg, prepare, mode=None):
    """On a CP=``world`` topology: parameter gradients of one step of ``cfg`` without
    checkpointing and with ``prepare(model)`` applied (inside the dispatch mode ``mode`` if
    given); returns whether they agree."""
    from lsp.model import DecoderLM, split_batch
    from lsp.parallel.topology import destroy_topology, init_topology

    topo = init_topology(1, world, 1)
    ids = split_batch(torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(0)),
                      ParallelContext(topo))
    grads = []
    for checkpointed in (False, True):
        model = DecoderLM(cfg, ParallelContext(topo, backend="torch"), seed=3)
        if checkpointed:
            prepare(model)
        with mode() if (mode and checkpointed) else contextlib.nullcontext():
            model(ids, ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    destroy_topology()
    return all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))


def _sac_rank(rank, world, save_attention):
    from torch.utils._python_dispatch import TorchDispatchMode

    from lsp.train.recompute import apply_activation_checkpointing, attention_ops

    attention = attention_ops()

    class CountKernelRuns(TorchDispatchMode):
        # outside checkpointing's own mode: sees an op only when it really runs, not when
        # selective checkpointing hands back its saved output
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountKernelRuns.n += func in attention
            return func(*args, **(kwargs or {}))

    same = _grads_without_and_with(
        world, _tiny_moe_model_cfg(pattern="GS"),
        lambda model: apply_activation_checkpointing(model, save_attention), CountKernelRuns)
    return CountKernelRuns.n, same


@pytest.mark.parametrize("save_attention,calls", [(True, 1), (False, 2)])
def test_checkpointing_keeps_attention_outputs_instead_of_recomputing(save_attention, calls):
    # one forward of the attention kernel with save_attention, two (forward + recompute) without;
    # gradients equal those of the model without checkpointing either way
    assert run_ranks(_sac_rank, 1, save_attention) == [(calls, True)]


def test_selective_checkpointing_under_context_parallelism():
    # CP=2: rank 1's queries see a key prefix twice their length (lower-right causal mask)
    results = run_ranks(_sac_rank, 2, True)
    assert [same for _, same in results] == [True, True]


def test_conv_recompute_keeps_only_its_input_and_gives_the_same_gradients():
    from lsp.layers.conv import ShortConvolution

    x = torch.randn(2, 20, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = []
    for recompute in (False, True):
        conv = ShortConvolution(6, 4, ParallelContext(params_dtype=torch.float64),
                                recompute=recompute)
        init_parameters(conv, seed=1, tp=1)
        xi = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.untyped_storage().nbytes()) or t, lambda t: t):
            y = conv(xi, copies=2)
        y.pow(2).sum().backward()
        res.append((y.detach(), xi.grad, conv.weight.grad, sum(saved)))
    (y0, dx0, dw0, saved0), (y1, dx1, dw1, saved1) = res
    assert torch.equal(y0, y1)
    assert torch.allclose(dx0, dx1, rtol=1e-12, atol=0) and torch.allclose(dw0, dw1, rtol=1e-12)
    # the input and the (zero) halo rows instead of the padded copy and the pre-activation output
    assert saved1 <= x.nbytes + 2 * 3 * 12 * 8 and saved0 >= 2 * x.nbytes


def _offload_rank(rank, world):
    from lsp.train import recompute as loop

    packed = []

    def spy_hooks():  # what the offload hooks see: one tensor, the block input, per block
        return torch.autograd.graph.saved_tensors_hooks(
            lambda t: packed.append(tuple(t.shape)) or t.to("cpu", copy=True), lambda t: t)

    loop._offload_hooks = spy_hooks
    cfg = _tiny_moe_model_cfg(pattern="GMS", mom_num_memories=2, mom_topk=1,
                              mom_memory_checkpointing=True, conv_checkpointing=True)
    same = _grads_without_and_with(
        world, cfg, lambda model: loop.apply_activation_checkpointing(model, True, offload=True))
    return packed, same


@pytest.mark.parametrize("world", [1, 2])
def test_offloaded_checkpoints_keep_only_block_inputs_and_give_the_same_gradients(world):
    # the G and M blocks go through the offload hooks with their input [T, B, D] alone; the S
    # block keeps its attention outputs on the device instead
    for packed, same in run_ranks(_offload_rank, world):
        assert same
        assert packed == [(24 // world, 1, 32)] * 2


def _flip_routing_when_run_again(router):
    """Make ``router`` choose the other experts whenever it runs again (as a recomputation does):
    every expert its previous run did not choose gets +10 on its logit, the chosen ones keep
    theirs. A stand-in for the ulp-level near ties that flip at scale; with the forward's
    experts replayed, the weights (the chosen logits) are unchanged. Both runs issue the same
    ops (selective checkpointing requires it of a recomputation)."""
    gating, runs = router.gating, []

    def gate(x):
        logits = gating(x)
        again = len(runs) % 2 == 1
        now = logits.detach().topk(router.topk, dim=-1).indices
        bump = torch.full_like(logits, 10.0 if again else 0.0)
        bump.scatter_(-1, runs[-1] if again else now, 0.0)
        runs.append(now)
        return logits + bump

    router.gating = gate


def _replay_rank(rank, world, offload):
    from torch.utils.checkpoint import CheckpointError, checkpoint

    from lsp.layers.ffn import MoEFFN
    from lsp.train.recompute import apply_activation_checkpointing

    def perturb(model):
        for m in model.modules():
            if isinstance(m, MoEFFN):
                _flip_routing_when_run_again(m.moe.router)

    def with_replay(model):
        perturb(model)
        apply_activation_checkpointing(model, offload=offload)

    def plain_checkpoint(model):  # the negative control: torch's checkpoint alone
        perturb(model)
        for b in model.blocks:
            b.forward = lambda x, _f=b.forward: checkpoint(_f, x, use_reentrant=False)

    cfg = _tiny_moe_model_cfg(pattern="GS", moe_aux_loss_coeff=0.0)
    replayed = _grads_without_and_with(world, cfg, with_replay)
    try:
        control = _grads_without_and_with(world, cfg, plain_checkpoint)
    except CheckpointError:
        control = "CheckpointError"
    return replayed, control


@pytest.mark.parametrize("world,offload", [(1, False), (1, True), (2, False)])
def test_recomputation_replays_the_forwards_routing(world, offload):
    # the recomputation's router prefers other experts; with the replay the gradients are those
    # of the step without checkpointing, without it torch's checkpoint fails or they differ
    for replayed, control in run_ranks(_replay_rank, world, offload):
        assert replayed is True
        assert control in ("CheckpointError", False)
