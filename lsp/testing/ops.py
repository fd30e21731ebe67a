"""Random op inputs, the op's positional arguments, the float64 per-token oracle and the error
measure: what the op, kernel and sequence-parallel tests and the GPU checks share.

An argument dict (``make_inputs``) holds ``q, k, v`` and, where present, ``beta``, ``g`` and
``initial_state``; ``op_args`` turns it into the positional arguments every op takes
(``q, k, v[, beta], g``), so a caller does not rebuild that list by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsp.kernels.kinds import Gate

from lsp.ops.delta_net.naive import naive_recurrent_delta_rule
from lsp.ops.linear_attn.naive import naive_recurrent_linear_attention

FAMILIES = ("linear_attention", "delta_rule")
GATES = tuple(g.label for g in Gate)  # "none", "head" ([B,T,H]), "key" ([B,T,H,K])


def rel_err(x, ref) -> float:
    """``||x - ref|| / ||ref||`` in float64 (``||x - ref||`` when ``ref`` is zero), on ``x``'s
    device; NaN or inf in ``x`` gives NaN or inf, which fails every ``<= tol``. Tensors or
    Python numbers."""
    x = torch.as_tensor(x).detach().double()
    ref = torch.as_tensor(ref).detach().to(x.device, torch.float64)
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
    gate_value: float | None = None,
    device=None,
    gates_dtype: torch.dtype | None = None,
    gate_fn=None,
) -> dict:
    """Random op arguments: float64 normal draws from a generator seeded with ``seed`` on
    ``device``, cast to ``dtype`` (``g``, ``beta`` and ``initial_state`` to ``gates_dtype`` when
    given: models keep them in float32), leaves with requires_grad.

    Keys are L2-normalised and beta lies in (0, 1), as in the models, so the delta rule is a
    contraction. Gates are ``logsigmoid`` of a normal draw (decays between ~0.05 and 1); with
    ``gate_value`` every odd token's gate is that value instead (0: no decay, -1000: the state is
    wiped), so one sequence holds both regimes; ``gate_fn(shape, generator)`` gives them all
    instead (e.g. full forgets, ``-inf``, at chosen tokens).
    """
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float64)

    args = {
        "q": rnd(B, T, H, K),
        "k": F.normalize(rnd(B, T, H, K), dim=-1),
        "v": rnd(B, T, H, V),
    }
    if family == "delta_rule":
        args["beta"] = torch.sigmoid(rnd(B, T, H))
    gshape = {"none": None, "head": (B, T, H), "key": (B, T, H, K)}[gate]
    if gshape is not None:
        if gate_fn is not None:
            args["g"] = gate_fn(gshape, gen)
        elif gate_value is None:
            args["g"] = F.logsigmoid(rnd(*gshape))
        else:
            g = torch.full(gshape, gate_value, device=device, dtype=torch.float64)
            g[:, ::2] = F.logsigmoid(rnd(*g[:, ::2].shape))
            args["g"] = g
    if with_state:
        args["initial_state"] = rnd(B, H, K, V)
    side = gates_dtype or dtype
    return {n: t.to(dtype if n in ("q", "k", "v") else side).requires_grad_()
            for n, t in args.items()}


def op_args(args: dict) -> list:
    """The positional arguments of an op (public, naive or kernel) from an argument dict:
    ``[q, k, v, beta, g]`` for the delta rule (``"beta"`` in ``args``), ``[q, k, v, g]``
    otherwise; a missing ``g`` is ``None``."""
    pos = [args["q"], args["k"], args["v"]]
    if "beta" in args:
        pos.append(args["beta"])
    return pos + [args.get("g")]


def call(fn, args: dict, **kw):
    """Call an op (public, naive or kernel) with an argument dict from ``make_inputs``."""
    return fn(*op_args(args), initial_state=args.get("initial_state"), **kw)


def naive_for(family: str):
    """The float64 per-token recurrence (the oracle) of an op family."""
    return naive_recurrent_delta_rule if family == "delta_rule" else naive_recurrent_linear_attention


def upcast(args: dict) -> dict:
    """Detached float64 copies (with requires_grad) of the same values, for the oracle."""
    return {n: t.detach().double().requires_grad_() for n, t in args.items()}


def outputs_and_grads(fn, args: dict, seed: int = 1, **kw):
    """Run ``fn`` with a final state and return ``(o, S, {name: grad})`` for random cotangents
    on both (float64 draws from a CPU generator seeded with ``seed``, cast to each output)."""
    o, S = call(fn, args, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.device, S.dtype)
    loss = (o * do).sum() + (S * dS).sum()
    names = list(args)
    grads = torch.autograd.grad(loss, [args[n] for n in names])
    return o, S, dict(zip(names, grads))


def kernels_on_cpu() -> None:
    """Let ``backend="triton"`` run lsp's kernels on CPU tensors in this process, under Triton's
    interpreter (a forked test rank or a CPU smoke run; call it before anything imports the
    kernel modules).

    Sets ``TRITON_INTERPRET=1``, imports the kernels (Triton decides at decoration), and
    patches ``lsp.ops.api.resolve_backend`` to take an explicit backend as given; on a GPU
    ``backend="triton"`` takes the same path unpatched.
    """
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    import lsp.kernels.common.chunk  # noqa: F401
    from lsp.ops import api

    api.resolve_backend = lambda op, backend, q: backend if backend != "auto" else "torch"
