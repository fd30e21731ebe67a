"""The short-convolution Triton kernels (``lsp.kernels.conv``) under Triton's CPU interpreter,
against torch's float64 ``conv1d``, and inside ``ShortConvolution``; plus an sm_90 compile.

``TRITON_INTERPRET=1`` is set while the kernel module is imported (decorated) and, by a fixture,
during each test here only (as in ``test_kernels_interpreter.py``).
"""

from __future__ import annotations

from triton_env import compile_results, interpreted

with interpreted():
    from lsp.kernels.conv import short_conv

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lsp.layers.conv import ShortConvolution  # noqa: E402
from lsp.testing import rel_err  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _reference(xp, w, dy, silu):
    """float64 torch conv1d on the transposed layout: output, d xp, d w."""
    x = xp.detach().double().requires_grad_()
    wt = w.detach().double().requires_grad_()
    y = F.conv1d(x.transpose(1, 2), wt[:, None, :], groups=wt.shape[0]).transpose(1, 2)
    if silu:
        y = F.silu(y)
    (y * dy.double()).sum().backward()
    return y.detach(), x.grad, wt.grad


@pytest.mark.parametrize("B,T,C,W", [(2, 37, 24, 4), (1, 70, 130, 4), (2, 5, 8, 3), (1, 64, 64, 1),
                                     (1, 1, 3, 4)])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_short_conv_matches_float64_conv1d(B, T, C, W, silu, dtype):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + C + W)
    xp = torch.randn(B, T + W - 1, C, generator=g).to(dtype)
    w = torch.randn(C, W, generator=g)  # the layer's weight stays float32 under autocast
    dy = torch.randn(B, T, C, generator=g).to(dtype)
    ref_y, ref_dx, ref_dw = _reference(xp, w, dy, silu)
    x1, w1 = xp.clone().requires_grad_(), w.clone().requires_grad_()
    y = short_conv(x1, w1, silu)
    (y * dy).sum().backward()
    assert y.dtype == dtype and y.shape == (B, T, C) and x1.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert rel_err(y, ref_y) < tol
    assert rel_err(x1.grad, ref_dx) < tol  # includes the halo rows' gradient
    assert rel_err(w1.grad, ref_dw) < tol


def test_short_conv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same C"):
        short_conv(torch.zeros(1, 10, 8), torch.zeros(6, 4), True)
    with pytest.raises(ValueError, match="halo rows"):
        short_conv(torch.zeros(1, 2, 8), torch.zeros(8, 4), True)


@pytest.mark.parametrize("activation,copies", [("silu", 1), (None, 1), ("silu", 3)])
def test_layer_triton_backend_equals_torch_backend(activation, copies):
    torch.manual_seed(0)
    conv = ShortConvolution(12, 4, activation=activation)
    with torch.no_grad():  # a layer's parameters are filled by the model's init; here by hand
        conv.weight.copy_(torch.randn(conv.weight.shape) * 0.5)
    x = torch.randn(2, 29, copies * 12)
    outs = {}
    for backend in ("torch", "triton"):
        conv.backend = backend
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        y = conv(xi, copies)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[backend] = (y.detach(), xi.grad, conv.weight.grad.clone())
    for a, b in zip(outs["triton"], outs["torch"]):
        assert rel_err(a, b) < 1e-5


def test_triton_backend_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    conv = ShortConvolution(8, 4, backend="triton")
    with pytest.raises(ValueError, match="conv_backend='torch' on CPU"):
        conv(torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="use one of"):
        ShortConvolution(8, 4, backend="cuda")


def test_model_config_conv_backend_is_checked():
    from lsp.train.config import load_config

    with pytest.raises(ValueError, match="conv_backend='cuda'"):
        load_config(["model.conv_backend=cuda"])


def test_triton_convolutions_on_cpu_ranks_are_refused_before_start(monkeypatch):
    from lsp.launch.train import run_cli

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="use model.conv_backend=torch"):
        run_cli(["model.conv_backend=triton", "parallel.dist_backend=gloo"])


SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lsp.kernels.conv.short_conv import conv_fwd_kernel, conv_bwd_dz_kernel, conv_bwd_dx_kernel
out = {}
for name, fn, sig, consts in [
    ("fwd", conv_fwd_kernel, {"xp": "*bf16", "w": "*fp32", "y": "*bf16", "T": "i32"},
     {"SILU": True}),
    ("dz", conv_bwd_dz_kernel, {"xp": "*bf16", "w": "*fp32", "dy": "*bf16", "dz": "*bf16",
                                "dwp": "*fp32", "T": "i32"}, {"SILU": True}),
    ("dx", conv_bwd_dx_kernel, {"dz": "*bf16", "w": "*fp32", "dxp": "*bf16", "T": "i32"}, {}),
]:
    consts = dict(consts, C=2048, W=4, BT=64, BC=64)
    sig = dict(sig, **{k: "constexpr" for k in consts})
    try:
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        out[name] = "ok" if c.asm["ptx"] else "no ptx"
    except Exception as e:
        out[name] = str(e).strip().splitlines()[-1][:300]
print(json.dumps(out))
"""


def test_conv_kernels_compile_for_sm90():
    results = compile_results(SCRIPT)
    assert results == {"fwd": "ok", "dz": "ok", "dx": "ok"}, results


def test_cp2_training_with_triton_convolutions_matches_torch_convolutions(tmp_path):
    """The default model (Gated DeltaNet, MoM and DeltaNet-style layers with short convolutions)
    on 2 CP ranks: the halo rows reach the kernel and the losses equal the conv1d path's."""
    from train_runs import CKPT, LAYOUT_ARGS, losses, train_on_forked_ranks

    runs = {}
    for name, extra in [("torch", []), ("triton", []), ("triton+ckpt", CKPT)]:
        run = tmp_path / name
        backend = name.split("+")[0]
        # the conv kernel takes no document offsets yet: one stream, no resets, on both paths;
        # +ckpt: selective activation checkpointing recomputes the kernels
        train_on_forked_ranks(["parallel=cp2", f"run_dir={run}", f"model.conv_backend={backend}",
                               "data.reset_state_at_document_boundaries=false"] + LAYOUT_ARGS
                              + extra)
        runs[name] = losses(run)
    assert len(runs["triton"]) == len(runs["triton+ckpt"]) == 5
    for name in ("triton", "triton+ckpt"):
        for a, b in zip(runs[name], runs["torch"]):
            assert rel_err(a, b) <= 1e-5, runs
