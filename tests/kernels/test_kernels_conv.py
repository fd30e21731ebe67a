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


@pytest.mark.parametrize("silu", [True, False])
def test_packed_documents_match_one_conv1d_per_document(silu):
    """``doc_pos``: each document is convolved on its own (zeros before its first token, halo
    rows included when the first document started on an earlier shard), the float64 reference
    runs torch's conv1d document by document."""
    W, C = 4, 10
    g = torch.Generator().manual_seed(5)
    # this shard's rows: the tail of a document from an earlier shard (halo rows are its
    # tokens), then documents of 1, 2, 6 and 13 tokens; positions in each document
    lens_here = [3, 1, 2, 6, 13]
    start_pos = [5, 0, 0, 0, 0]  # the first document already has 5 tokens before the shard
    T = sum(lens_here)
    pos = torch.cat([torch.arange(p, p + n) for p, n in zip(start_pos, lens_here)])[None]
    xp = torch.randn(1, T + W - 1, C, generator=g, dtype=torch.float64)
    w = torch.randn(C, W, generator=g, dtype=torch.float64)
    dy = torch.randn(1, T, C, generator=g, dtype=torch.float64)
    # reference: per document, the halo is real only for the document that started earlier
    x = xp.clone().requires_grad_()
    wt = w.clone().requires_grad_()
    outs, row = [], W - 1
    for n, (p0, ln) in enumerate(zip(start_pos, lens_here)):
        before = x[:, row - min(p0, W - 1):row] if p0 else x[:, :0]
        doc = torch.cat([x.new_zeros(1, W - 1 - before.shape[1], C), before,
                         x[:, row:row + ln]], 1)
        y = F.conv1d(doc.transpose(1, 2), wt[:, None, :], groups=C).transpose(1, 2)
        outs.append(F.silu(y) if silu else y)
        row += ln
    ref_y = torch.cat(outs, 1)
    (ref_y * dy).sum().backward()
    x1, w1 = xp.float().requires_grad_(), w.float().requires_grad_()
    y = short_conv(x1, w1, silu, doc_pos=pos)
    (y * dy.float()).sum().backward()
    assert rel_err(y, ref_y) < 1e-6
    assert rel_err(x1.grad, x.grad) < 1e-6  # a halo row feeds only the document it belongs to
    assert rel_err(w1.grad, wt.grad) < 1e-6
    with pytest.raises(ValueError, match="doc_pos"):
        short_conv(x1, w1, silu, doc_pos=pos[:, 1:])


def test_layer_triton_backend_takes_packed_documents_like_the_torch_backend():
    """``ShortConvolution(backend="triton")`` with ``cu_seqlens`` equals the torch backend's
    masked form (tested against per-document convolutions in ``tests/layers``)."""
    torch.manual_seed(1)
    conv = ShortConvolution(6, 4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape) * 0.5)
    x = torch.randn(1, 23, 12)
    cu = torch.tensor([0, 1, 3, 10, 23])
    outs = {}
    for backend in ("torch", "triton"):
        conv.backend = backend
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        y = conv(xi, 2, cu_seqlens=cu)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[backend] = (y.detach(), xi.grad, conv.weight.grad.clone())
    for a, b in zip(outs["torch"], outs["triton"]):
        assert rel_err(b, a) < 1e-6


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
for has_pos in (False, True):
    for name, fn, sig, consts in [
        ("fwd", conv_fwd_kernel, {"xp": "*bf16", "w": "*fp32", "y": "*bf16", "pos": "*i32",
                                  "T": "i32"}, {"SILU": True}),
        ("dz", conv_bwd_dz_kernel, {"xp": "*bf16", "w": "*fp32", "dy": "*bf16", "dz": "*bf16",
                                    "dwp": "*fp32", "pos": "*i32", "T": "i32"}, {"SILU": True}),
        ("dx", conv_bwd_dx_kernel, {"dz": "*bf16", "w": "*fp32", "dxp": "*bf16", "pos": "*i32",
                                    "T": "i32"}, {}),
    ]:
        consts = dict(consts, C=2048, W=4, BT=64, BC=64, HAS_POS=has_pos)
        sig = dict(sig, **{k: "constexpr" for k in consts})
        key = name + ("-packed" if has_pos else "")
        try:
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            out[key] = "ok" if c.asm["ptx"] else "no ptx"
        except Exception as e:
            out[key] = str(e).strip().splitlines()[-1][:300]
print(json.dumps(out))
"""


def test_conv_kernels_compile_for_sm90():
    results = compile_results(SCRIPT)
    assert results == {k: "ok" for k in ("fwd", "dz", "dx", "fwd-packed", "dz-packed",
                                         "dx-packed")}, results


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
