"""Compile the WY intra-chunk kernel for Hopper (sm_90) on this CPU machine.

The Triton interpreter does not type-check; the real compiler does, and on the H100 it rejected
``intra_fwd_kernel`` when the key and value block widths differ (K=32 with the sequence-parallel
augmented V=64: one name bound to blocks of two widths in the two branches of a runtime ``if``).
Triton's wheel carries ``ptxas``, so the front end and PTX generation run without a GPU. The
compile runs in a fresh process: kernels decorated there are real ``JITFunction``s, whatever
the interpreter tests of this session did to ``TRITON_INTERPRET``.
"""

from __future__ import annotations

from triton_env import compile_results

PRELUDE = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def build(fn, sig, consts, warps):  # sm_90: "ok", "no ptx" or the compiler's last error line
    try:
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        return "ok" if fn.__name__ in c.asm["ptx"] else "no ptx"
    except Exception as e:
        return str(e).strip().splitlines()[-1][:300]
"""

SCRIPT = PRELUDE + r"""
from lsp.kernels.delta_net.intra import intra_fwd_kernel
sig = {"k": "*bf16", "v": "*bf16", "beta": "*fp32", "G": "*fp32", "Pm": "*fp32", "w": "*bf16",
       "u": "*bf16", "TA": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32", "T": "i32",
       "H": "constexpr", "K": "constexpr", "V": "constexpr", "BT": "constexpr", "BC": "constexpr",
       "NC": "constexpr", "BKI": "constexpr", "BVI": "constexpr", "GATE": "constexpr",
       "STORE_TA": "constexpr", "IP": "constexpr", "IS_VARLEN": "constexpr"}
out = {}
for K, V in [(32, 64), (64, 32), (128, 256)]:
    for gate in (0, 1, 2):
        consts = {"H": 4, "K": K, "V": V, "BT": 64, "BC": 16, "NC": 4, "BKI": min(K, 64),
                  "BVI": min(V, 64), "GATE": gate, "STORE_TA": False, "IP": "tf32",
                  "IS_VARLEN": False}
        out[f"K{K}-V{V}-g{gate}"] = build(intra_fwd_kernel, sig, consts, 4)
print(json.dumps(out))
"""


def test_intra_fwd_kernel_compiles_for_sm90():
    results = compile_results(SCRIPT)
    assert len(results) == 9
    bad = {k: v for k, v in results.items() if v != "ok"}
    assert not bad, bad


SCRIPT_WY = PRELUDE + r"""
from lsp.kernels.delta_net import wy
ptr = lambda t, names: {n: t for n in names.split()}
common = {"cu_seqlens": "*i64", "chunk_indices": "*i32", "T": "i32"}
cases = {
    "kkt_solve": (wy.kkt_solve_kernel, {**ptr("*bf16", "k beta Ai"), "G": "*fp32", **common},
                  dict(H=4, K=64, BT=64, BC=16, NC=4, BK=64), 1),
    "wu": (wy.wu_kernel, {**ptr("*bf16", "k v beta Ai w u"), "G": "*fp32", **common},
           dict(H=4, K=64, V=32, BT=64, BW=64), 4),
    "wy_bwd": (wy.wy_bwd_scalar_kernel,
               {**ptr("*bf16", "k v beta Ai du dk dv dbeta scratch"),
                **ptr("*fp32", "G dw dk_acc dG dGl dg"), **common, "NT": "i32"},
               dict(H=4, K=64, V=32, BT=64, BW=32, DL_LOW=True), 4),
}
# dL in float32 (stages.WY_DL_INPUT_DTYPE off)
cases["wy_bwd_variants"] = (cases["wy_bwd"][0], cases["wy_bwd"][1],
                            dict(cases["wy_bwd"][2], DL_LOW=False), 4)
out = {}
for name, (fn, sig, consts, warps) in cases.items():
    for gate in (0, 1):
        c2 = dict(consts, GATE=gate, IS_VARLEN=gate == 1, IP="tf32")
        out[f"{name}-g{gate}"] = build(fn, {**sig, **{k: "constexpr" for k in c2}}, c2, warps)
print(json.dumps(out))
"""


VARLEN_SCRIPT = PRELUDE + r"""
from lsp.kernels.common.state import state_bwd_kernel, state_fwd_kernel
from lsp.kernels.delta_net.intra import intra_fwd_kernel
ptr = {"cu_seqlens": "*i64", "chunk_indices": "*i32", "segments": "*i32"}
ptr.update({n: "*fp32" for n in ("beta", "G", "Pm", "TA", "s0", "s_end", "a_pair", "seg_dec",
                                 "Aqk", "ds0", "ds_start")})
scal = {"T": "i32", "NT": "i32", "SEG": "i32", "P": "i32", "scale": "fp32"}
base = dict(H=4, K=128, V=128, BT=64, GATE=1, IP="tf32", IS_VARLEN=True)
cases = {
    "intra": (intra_fwd_kernel, dict(base, BC=16, NC=4, BKI=64, BVI=64, STORE_TA=True), 4),
    # the state passes at the 4 warps they run at (utils.state_num_warps)
    "state_fwd": (state_fwd_kernel, dict(base, BK=128, BV=64, NV=2, DELTA=True, MODE=1,
                                         HAS_S0=True, STORE_END=True), 4),
    "state_bwd": (state_bwd_kernel, dict(base, BK=128, BV=64, DELTA=True, MODE=1,
                                         HAS_DS0=True), 4),
}
out = {}
for name, (kern, consts, warps) in cases.items():
    sig = {n: "constexpr" if n in consts else scal.get(n, ptr.get(n, "*bf16"))
           for n in kern.arg_names}
    out[name] = build(kern, sig, consts, warps)
print(json.dumps(out))
"""


def test_scalar_gate_wy_kernels_compile_for_sm90():
    # the scalar-gate WY kernels (delta_net/wy.py) with and without packed-document offsets, and
    # the WY backward with both of its A/B switches on
    results = compile_results(SCRIPT_WY)
    assert len(results) == 8
    bad = {k: v for k, v in results.items() if v != "ok"}
    assert not bad, bad


def test_packed_document_kernels_compile_for_sm90():
    """The ``IS_VARLEN`` builds (offsets loaded as int64 next to int32 chunk indices, a loop
    bound read from memory) type-check in the real compiler: the per-chunk WY kernel and the
    state passes, which index per-document states and per-chunk buffers."""
    results = compile_results(VARLEN_SCRIPT)
    assert results == {"intra": "ok", "state_fwd": "ok", "state_bwd": "ok"}, results
