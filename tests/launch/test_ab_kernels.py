"""``launch/ab_kernels.py`` on the CPU: its variants name real switches, and it puts them back."""

from __future__ import annotations

from triton_env import interpreted

with interpreted():  # whichever test module imports the kernels first decides how they decorate
    from lsp.kernels.common import chunk, pairwise
    from lsp.kernels.delta_net import stages

import pytest  # noqa: E402

from lsp.launch import ab_kernels as ab  # noqa: E402


def _state():
    home = {n: (stages if n.startswith("WY_") else chunk) for n in ("FUSE_PAIRWISE", *ab._SWITCHES)}
    return {n: getattr(m, n) for n, m in home.items()}, dict(pairwise.PAIR_WARPS)


def test_every_variant_sets_existing_switches_and_reset_restores_main():
    before = _state()
    sw = ab.Switches()
    for exp in ab.EXPERIMENTS.values():
        first = next(iter(exp["variants"].values()))
        sw.use(first)  # the first variant is main's default
        assert _state() == before
        for switches in exp["variants"].values():
            sw.use(switches)
            for name, value in switches.items():
                if name == "PAIR_WARPS":
                    assert all(pairwise.PAIR_WARPS[k] == w for k, w in value.items())
                else:
                    assert _state()[0][name] == value
    sw.use({"GRAD_BLOCK_V": 128, "WY_DL_INPUT_DTYPE": False, "PAIR_WARPS": {"fwd": 8}})
    assert not stages.WY_DL_INPUT_DTYPE and chunk.GRAD_BLOCK_V == 128
    sw.reset()
    assert _state() == before
    with pytest.raises(SystemExit, match="unknown switch GRAD_TYPO"):
        sw.use({"GRAD_TYPO": True})
    sw.reset()


def test_checked_cases_cover_the_experiment_gates_without_the_slow_fp32_builds():
    for name, exp in ab.EXPERIMENTS.items():
        cases = ab.cases(name)
        assert {c["gate"] for c in cases} == {g for _, g in exp["ops"]}
        assert {c["family"] for c in cases} == {f for f, _ in exp["ops"]}
        assert not [c for c in cases if c["dtype"] == "fp32" and c["K"] >= 128]
        assert any(c.get("gate_value") == -1000.0 for c in cases)  # extreme gates stay
