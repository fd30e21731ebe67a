"""Shared test helpers: random inputs for both op families, the float64 oracle, error measure.

Importable from every test module (pytest puts tests/ on sys.path) and from spawned ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsp.ops.delta_net.naive import naive_recurrent_delta_rule
from lsp.ops.linear_attn.naive import naive_recurrent_linear_attention

FAMILIES = ("linear_attention", "delta_rule")
GATES = ("none", "scalar", "vector")
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    x, ref = x.detach().double(), ref.detach().double()
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


def make_inputs(
    family: str,
    gate: str,
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    dtype: torch.dtype = torch.float64,
    with_state: bool = True,
    seed: int = 0,
    gate_fn=None,
) -> dict:
    """Random op arguments (float64 draws cast to ``dtype``), leaves with requires_grad.

    Keys are L2-normalised and beta lies in (0, 1), as in the models, so the delta rule is a
    contraction. Gates are ``logsigmoid`` of a normal draw (decays between ~0.05 and 1) unless
    ``gate_fn(shape, generator)`` gives them.
    """
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    args = {
        "q": rnd(B, T, H, K),
        "k": F.normalize(rnd(B, T, H, K), dim=-1),
        "v": rnd(B, T, H, V),
    }
    if family == "delta_rule":
        args["beta"] = torch.sigmoid(rnd(B, T, H))
    gshape = {"none": None, "scalar": (B, T, H), "vector": (B, T, H, K)}[gate]
    if gshape is not None:
        args["g"] = gate_fn(gshape, gen) if gate_fn else F.logsigmoid(rnd(*gshape))
    if with_state:
        args["initial_state"] = rnd(B, H, K, V)
    return {n: t.to(dtype).requires_grad_() for n, t in args.items()}


def call(fn, args: dict, **kw):
    """Call an op (public or naive) with the argument dict from ``make_inputs``."""
    pos = [args["q"], args["k"], args["v"]]
    if "beta" in args:
        pos.append(args["beta"])
    return fn(*pos, args.get("g"), initial_state=args.get("initial_state"), **kw)


def naive_for(family: str):
    return naive_recurrent_delta_rule if family == "delta_rule" else naive_recurrent_linear_attention


def upcast(args: dict) -> dict:
    """Detached float64 copies (with requires_grad) of the same values, for the oracle."""
    return {n: t.detach().double().requires_grad_() for n, t in args.items()}


def outputs_and_grads(fn, args: dict, seed: int = 1, **kw):
    """Run ``fn`` with a final state and return (o, S, {name: grad}) for a random cotangent."""
    o, S = call(fn, args, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    loss = (o * do).sum() + (S * dS).sum()
    names = list(args)
    grads = torch.autograd.grad(loss, [args[n] for n in names])
    return o, S, dict(zip(names, grads))
