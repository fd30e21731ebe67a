"""GPU check: no unexpected host synchronisation in a training step's forward and backward.

``python -m lsp.launch.check_syncs [--out syncs.json]`` builds a small hybrid model (Gated
DeltaNet, MoM, softmax attention, MoE and dense feed-forwards) on one GPU, runs one warm-up
step (kernel compilation and plan building may wait for the device), then one forward +
backward under ``torch.cuda.set_sync_debug_mode`` with the autograd engine on the calling thread,
so that every synchronising CUDA call is reported with the Python line that made it. Two
configurations:

- ``padded``: MoE with ``capacity_factor = num_experts / topk`` (megatron's drop-and-pad
  dispatch, nothing dropped): no sync is allowed at all, and the step is run once more under
  ``set_sync_debug_mode("error")``;
- ``dropless``: the default MoE, whose dispatcher must size every expert's slice on the host
  (``lsp.layers.ffn``'s module doc): syncs are allowed only in megatron's MoE dispatch code
  (:data:`ALLOWED`); any other site fails the check.

torch's sync debug mode sees stream and device synchronisation and the copies that wait for
them (``.item()``, ``nonzero``, ``masked_select``, device-to-host copies); it does not see a
wait on a CUDA event, which is how megatron's dropless dispatcher waits for its counts.

Prints every sync site and writes JSON; exits non-zero on an unexpected sync.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings

import torch

# (path fragment of the Python frame that made the sync, why it cannot go) for dropless MoE
ALLOWED = [
    ("megatron/core/transformer/moe/token_dispatcher.py",
     "dropless alltoall dispatch: per-expert token counts copied to the host to size the "
     "experts' slices (the dispatcher's cuda_sync_point)"),
    ("megatron/core/transformer/moe/moe_utils.py",
     "dropless unfused permute: masked_select of the routed tokens (data-dependent size)"),
    ("megatron/core/transformer/moe/experts.py",
     "dropless experts: split of the permuted tokens by the host's per-expert counts"),
]

CFG = dict(vocab_size=512, hidden_size=256, pattern="GMSG", ffn_pattern="EFEF", num_heads=4,
           head_dim=64, ffn_hidden_size=512, num_experts=4, moe_topk=2,
           moe_ffn_hidden_size=256, mom_num_memories=4, mom_topk=2, fp32_residual_connection=False)
T = 4096


def _site(stack) -> str:
    """The innermost frame outside torch and this file: the line that made the sync."""
    here = os.path.abspath(__file__)
    for fr in reversed(stack):
        f = fr.filename.replace(os.sep, "/")
        if "/torch/" in f or "warnings.py" in f or os.path.abspath(fr.filename) == here:
            continue
        return f"{fr.filename}:{fr.lineno} ({fr.name})"
    return "unknown"


def _step(model, ids, labels):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels, loss_mask=torch.ones_like(labels, dtype=torch.float32))
    out.loss.backward()


def _record(model, ids, labels) -> list[dict]:
    """Run one step under sync debug mode ``warn``; every sync with its site and stack."""
    found = []

    def hook(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing CUDA operation" in str(message):
            stack = traceback.extract_stack()[:-1]
            found.append(dict(site=_site(stack), message=str(message).splitlines()[0],
                              stack=[f"{f.filename}:{f.lineno} {f.name}" for f in stack[-12:]]))

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autograd.set_multithreading_enabled(False):
                _step(model, ids, labels)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return found


def check(name: str, capacity_factor) -> dict:
    from lsp.layers import ParallelContext
    from lsp.model import DecoderLM, ModelConfig
    from lsp.parallel.topology import init_topology

    topo = init_topology()
    cfg = ModelConfig(**CFG, moe_capacity_factor=capacity_factor)
    model = DecoderLM(cfg, ParallelContext(topo)).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda", generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (1, T), device="cuda", generator=gen)
    _step(model, ids, labels)  # warm-up: compilation, cuDNN plans, allocator growth
    model.zero_grad(set_to_none=True)
    found = _record(model, ids, labels)
    allowed = [] if capacity_factor is not None else ALLOWED
    for s in found:
        s["allowed"] = next((why for frag, why in allowed if frag in s["site"]), None)
    bad = [s for s in found if s["allowed"] is None]
    strict = None
    if capacity_factor is not None and not found:
        model.zero_grad(set_to_none=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autograd.set_multithreading_enabled(False):
                _step(model, ids, labels)
            strict = "passed"
        except RuntimeError as e:
            strict = f"failed: {e}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ok = not bad and strict in (None, "passed")
    print(f"[{name}] {len(found)} synchronising call(s) in forward + backward, "
          f"{len(bad)} unexpected; strict mode: {strict}; {'OK' if ok else 'FAIL'}")
    for s in found:
        print(f"  {'allowed' if s['allowed'] else 'UNEXPECTED'}: {s['site']}: {s['message']}")
        if not s["allowed"]:
            print("    " + "\n    ".join(s["stack"]))
    return dict(config=name, capacity_factor=capacity_factor, syncs=found, strict=strict, ok=ok)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lsp.launch.check_syncs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="syncs.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("check_syncs runs on a CUDA device (CPU ops do not synchronise)")
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    E, k = CFG["num_experts"], CFG["moe_topk"]
    try:
        results = [check("padded", E / k), check("dropless", None)]
    finally:
        dist.destroy_process_group()
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, T=T, model=CFG)
    with open(a.out, "w") as f:
        json.dump(dict(info=info, results=results), f, indent=1)
    if not all(r["ok"] for r in results):
        sys.exit("unexpected host synchronisation in the step: see above")


if __name__ == "__main__":
    main()
