"""Every bad input raises ValueError with a message that names the value and the fix."""

from __future__ import annotations

import re

import pytest
import torch

import lsp
from lsp import kernels
from lsp.testing import op_args

B, T, H, K, V = 2, 5, 3, 4, 6


def base(family="delta_rule"):
    torch.manual_seed(0)
    a = {
        "q": torch.randn(B, T, H, K),
        "k": torch.randn(B, T, H, K),
        "v": torch.randn(B, T, H, V),
        "g": torch.randn(B, T, H).clamp(max=0),
    }
    if family == "delta_rule":
        a["beta"] = torch.rand(B, T, H)
    return a


def run(family="delta_rule", **changes):
    a = base(family)
    kw = {n: changes.pop(n) for n in list(changes) if n in
          ("scale", "initial_state", "output_final_state", "backend")}
    a.update(changes)
    op = lsp.ops.delta_rule if family == "delta_rule" else lsp.ops.linear_attention
    return op(*op_args(a), **kw)


CASES = [
    # (changes, pattern the message must contain)
    ({"q": torch.randn(T, H, K)}, r"q has shape \[5, 3, 4\] \(3 dims\).*\[B, T, H, K\].*transpose"),
    ({"q": [1.0]}, r"q must be a torch\.Tensor of shape \[B, T, H, K\], got list"),
    ({"k": torch.randn(B, T, H, K + 1)}, r"k has shape \[2, 5, 3, 5\] but q has \[2, 5, 3, 4\]"),
    ({"v": torch.randn(B, T + 1, H, V)}, r"v has shape \[2, 6, 3, 6\].*\[B, T, H, V\] = \[2, 5, 3, V\]"),
    ({"v": torch.randn(B, T, H, V, dtype=torch.float64)}, r"dtypes torch\.float32, torch\.float32, torch\.float64; they must match"),
    ({"q": torch.randint(0, 3, (B, T, H, K))}, r"q has dtype torch\.int64; use one of float16"),
    ({"q": torch.randn(B, 0, H, K), "k": torch.randn(B, 0, H, K), "v": torch.randn(B, 0, H, V),
      "g": None, "beta": torch.rand(B, 0, H)}, r"every dim must be >= 1"),
    ({"g": torch.randn(B, T)}, r"g has shape \[2, 5\]; .*\[B, T, H\] = \[2, 5, 3\].*\[B, T, H, K\] = \[2, 5, 3, 4\]"),
    ({"g": torch.randn(B, T, H, K + 2)}, r"g has shape \[2, 5, 3, 6\]"),
    ({"g": torch.randn(B, T, H, K, 1)}, r"g has shape \[2, 5, 3, 4, 1\]"),
    ({"beta": None}, r"beta is None; the delta rule needs beta \[B, T, H\] = \[2, 5, 3\]"),
    ({"beta": torch.rand(B, T, H, 1)}, r"beta has shape \[2, 5, 3, 1\]; it must be \[B, T, H\] = \[2, 5, 3\]"),
    ({"scale": float("nan")}, r"scale=nan is not finite; pass a finite float such as 0\.5"),
    ({"scale": float("inf")}, r"scale=inf is not finite"),
    ({"scale": "0.5"}, r"scale='0\.5' is not a real number"),
    ({"scale": True}, r"scale=True is not a real number"),
    ({"initial_state": torch.zeros(B, H, V, K)}, r"initial_state has shape \[2, 3, 6, 4\]; the state must be \[B, H, K, V\] = \[2, 3, 4, 6\]"),
    ({"initial_state": torch.zeros(H, K, V)}, r"initial_state has shape \[3, 4, 6\]"),
    ({"output_final_state": "yes"}, r"output_final_state='yes'; pass True or False"),
    ({"backend": "cuda"}, r"backend='cuda' is unknown; choose one of \('auto', 'torch', 'triton'\)"),
]


@pytest.mark.parametrize("changes,pattern", CASES, ids=[p[:30] for _, p in CASES])
def test_bad_input_raises_named_error(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        run("delta_rule", **changes)


@pytest.mark.parametrize("changes,pattern", [c for c in CASES if "beta" not in c[0]],
                         ids=[p[:30] for c, p in CASES if "beta" not in c])
def test_bad_input_raises_named_error_linear_attention(changes, pattern):
    with pytest.raises(ValueError, match=re.compile(pattern)):
        run("linear_attention", **changes)


def test_error_names_the_op():
    with pytest.raises(ValueError, match=r"^linear_attention: "):
        run("linear_attention", scale=float("nan"))
    with pytest.raises(ValueError, match=r"^delta_rule: "):
        run("delta_rule", scale=float("nan"))


def test_triton_backend_without_usable_kernels_raises():
    reason = kernels.unavailable_reason()
    if reason is None:  # kernels present: on CPU tensors they still cannot run
        pattern = r"backend='triton' needs CUDA tensors, got tensors on cpu"
    else:
        pattern = r"backend='triton' cannot run: .*backend='torch'"
    with pytest.raises(ValueError, match=pattern):
        run("linear_attention", backend="triton")


def test_auto_backend_on_cpu_runs_the_torch_path():
    o_auto, _ = run("delta_rule", backend="auto")
    o_torch, _ = run("delta_rule", backend="torch")
    assert torch.equal(o_auto, o_torch)
