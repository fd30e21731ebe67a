"""Layout-independent, atomic training checkpoints.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<N>`` holding

- ``model.pt``: every parameter as its *whole* (one-process) tensor under its layout-free name
  (TP shards gathered along megatron's ``partition_dim``; experts named by their global index);
- ``optimizer.pt``: AdamW's ``exp_avg`` / ``exp_avg_sq`` / ``step`` per parameter, the same way;
- ``rng.pt``: every rank's torch (and CUDA) RNG state;
- ``meta.json``: step, samples consumed, the model config, the layout it was saved from.

Because tensors are stored whole and named without the layout, a checkpoint loads into any
TP x CP x EP x DP layout: each rank takes its shard on load (``lsp.layers.init.shard_of``).
Tensor files are read with ``torch.load(weights_only=True)`` and metadata is JSON, so loading
never unpickles code. Rank 0 writes into ``step_<N>.tmp`` and renames it when complete, then
updates ``latest`` by writing a temporary file and renaming it: a crash mid-save leaves the
previous checkpoint intact and ``latest`` pointing at it. Only the newest ``keep_last`` are kept.

Written on top of ``torch.distributed`` collectives by hand: megatron's dist_checkpointing needs
a ``sharded_state_dict`` from every module, which lsp's own layers do not implement; gathering
whole tensors costs rank 0 host memory of the model plus optimizer (about 16 bytes a parameter),
fine for the model sizes lsp ships configs for.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from lsp.layers.init import is_tp_split, layout_free_names, shard_of

# model settings that change how a step runs, not which parameters exist: free to change on resume
ARCH_KEYS_IGNORED = ("seed", "moe_grouped_gemm", "conv_backend", "conv_checkpointing",
                     "mom_memory_checkpointing", "attention_backend")


def _is_expert(p) -> bool:
    return getattr(p, "allreduce", True) is False


def global_names(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, list]]:
    """``(local name, parameter, [(global name, view) ...])`` for every parameter.

    A parameter is one tensor under one name, except megatron's grouped-GEMM expert weights,
    which hold several experts and are listed as one ``linear_fc1/2.weight`` view per expert
    (the names ``SequentialMLP`` uses, so either form loads into the other).
    """
    return [(name, p, layout_free_names(name, p)) for name, p in model.named_parameters()]


def _view(t: torch.Tensor, how):
    """A tensor shaped like the parameter ``t`` seen through a grouped-expert view."""
    if how is None:
        return t
    blocks, i = how
    return t.view(blocks.shape)[i].t()


def _gather_tp(t: torch.Tensor, p, topo) -> torch.Tensor:
    """The whole tensor from this TP group's shards (megatron's strided split)."""
    if not (is_tp_split(p) and topo is not None and topo.tp > 1):
        return t
    parts = [torch.empty_like(t) for _ in range(topo.tp)]
    dist.all_gather(parts, t.contiguous(), group=topo.tp_group)
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
    sub = [torch.chunk(x, stride, dim=dim) for x in parts]
    return torch.cat([sub[r][j] for j in range(stride) for r in range(topo.tp)], dim=dim)


def _collect(model, optimizer, topo) -> tuple[dict, dict]:
    """Whole tensors on rank 0 (others return partial dicts): model and optimizer state."""
    tensors, optim = {}, {}
    local_expert_t, local_expert_o = {}, {}
    for _, p, views in global_names(model):
        full = _gather_tp(p.detach(), p, topo)
        st = optimizer.state.get(p, {}) if optimizer is not None else {}
        opt_full = {k: _gather_tp(v.detach(), p, topo) if torch.is_tensor(v) and v.shape == p.shape
                    else (v.detach().clone() if torch.is_tensor(v) else torch.tensor(v))
                    for k, v in st.items()}
        for gname, how in views:
            dst_t, dst_o = (local_expert_t, local_expert_o) if _is_expert(p) else (tensors, optim)
            dst_t[gname] = _view(full, how).cpu().clone()
            for k, v in opt_full.items():
                dst_o[f"{gname}::{k}"] = (_view(v, how) if v.shape == p.shape else v).cpu().clone()
    if topo is not None and topo.ep > 1:
        for local, dst in ((local_expert_t, tensors), (local_expert_o, optim)):
            parts = [None] * topo.ep
            dist.all_gather_object(parts, local, group=topo.ep_group)
            for part in parts:
                dst.update(part)
    else:
        tensors.update(local_expert_t)
        optim.update(local_expert_o)
    return tensors, optim


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str, step: int, model, optimizer, topo, meta: dict,
                    keep_last: int = 2) -> Path | None:
    """Collective: every rank calls it. Returns the checkpoint folder on rank 0."""
    tensors, optim = _collect(model, optimizer, topo)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    rngs = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    final = None
    if rank == 0:
        root = Path(run_dir) / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{step:08d}"
        tmp = root / f"step_{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _torch_save(tensors, tmp / "model.pt")
        _torch_save(optim, tmp / "optimizer.pt")
        _torch_save({f"rank{r}_{k}": v for r, d in enumerate(rngs) for k, v in d.items()},
                    tmp / "rng.pt")
        _atomic_write_text(tmp / "meta.json", json.dumps({**meta, "step": step,
                                                           "world_size": world}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name)
        steps = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_")
                       and not d.name.endswith(".tmp"))
        for old in steps[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def find_checkpoint(run_dir: str, resume: str) -> Path | None:
    """The checkpoint to resume from: ``resume`` is ``auto`` (latest in run_dir, if any),
    ``none``, or a path to a ``step_<N>`` folder."""
    if resume in (None, "none", "", False):
        return None
    if resume == "auto":
        latest = Path(run_dir) / "checkpoints" / "latest"
        if not latest.exists():
            return None
        path = latest.parent / latest.read_text().strip()
    else:
        path = Path(resume)
    if not path.is_dir():
        raise ValueError(
            f"checkpoint {path} does not exist; pass train.resume=auto (latest in the run dir), "
            "none, or the path of a step_<N> folder"
        )
    return path


def _load_tensors(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing: the checkpoint is incomplete; "
                         f"delete {path.parent} or resume from an earlier step_<N>")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint file {path} is corrupt or not an lsp checkpoint ({exc}); "
                         f"delete {path.parent} or resume from an earlier step_<N>") from exc


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} has no readable meta.json ({exc}); it is incomplete "
                         "or corrupt: delete it or resume from an earlier step_<N>") from exc


def check_compatible(meta: dict, model_cfg: dict, path: Path) -> None:
    """Raise when the checkpoint's model differs from the one being trained."""
    saved = meta.get("model", {})
    diff = {k: (saved.get(k), model_cfg.get(k)) for k in set(saved) | set(model_cfg)
            if k not in ARCH_KEYS_IGNORED and saved.get(k) != model_cfg.get(k)}
    if diff:
        items = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cannot resume from {path}: the model differs ({items}); use the same "
                         "model config or start a new run_dir")


def _step_on_param_device(optimizer, p) -> bool:
    """Whether ``p``'s optimizer keeps its ``step`` count on the parameter's device, as torch's
    ``Optimizer.load_state_dict`` places it: fused and capturable Adam(W) need it there (a CPU
    step makes the fused CUDA kernel refuse, 'state_steps is on cpu'); others keep it on CPU."""
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return bool(group.get("fused") or group.get("capturable"))
    return False


@torch.no_grad()
def load_checkpoint(path: Path, model, optimizer, topo) -> dict:
    """Load ``path`` into this rank's shard of ``model`` and ``optimizer``; returns meta."""
    meta = read_meta(path)
    tensors = _load_tensors(path / "model.pt")
    optim = _load_tensors(path / "optimizer.pt") if optimizer is not None else {}
    tp = 1 if topo is None else topo.tp
    tp_rank = 0 if topo is None else topo.tp_rank
    for name, p, views in global_names(model):
        for gname, how in views:
            if gname not in tensors:
                raise ValueError(f"checkpoint {path} has no tensor {gname!r} (parameter {name}); "
                                 "it was saved from a different model")
            target = _view(p.data, how)
            full = tensors[gname]
            val = full if how is not None else shard_of(full, p, tp, tp_rank)
            if val.shape != target.shape:
                raise ValueError(f"checkpoint tensor {gname!r} has shape {tuple(full.shape)}, "
                                 f"which does not fit parameter {name} {tuple(target.shape)}")
            target.copy_(val.to(target.dtype))
        if optimizer is None:
            continue
        keys = {k.split("::", 1)[1] for k in optim if k.split("::", 1)[0] == views[0][0]}
        if not keys:
            continue
        state = {}
        on_device = _step_on_param_device(optimizer, p)
        for k in keys:
            vals = [optim[f"{g}::{k}"] for g, _ in views]
            if vals[0].dim() == 0:
                state[k] = vals[0].clone()
                if k == "step" and on_device:
                    state[k] = state[k].to(device=p.device, dtype=torch.float32)
                continue
            buf = torch.empty_like(p.data, dtype=vals[0].dtype)
            for (g, how), v in zip(views, vals):
                if how is None:
                    buf.copy_(shard_of(v, p, tp, tp_rank))
                else:
                    _view(buf, how).copy_(v)
            state[k] = buf
        optimizer.state[p] = state
    rng = _load_tensors(path / "rng.pt")
    rank = dist.get_rank() if dist.is_initialized() else 0
    src = rank if f"rank{rank}_cpu" in rng and meta.get("world_size") == (
        dist.get_world_size() if dist.is_initialized() else 1) else 0
    torch.set_rng_state(rng[f"rank{src}_cpu"])
    if torch.cuda.is_available() and f"rank{src}_cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{src}_cuda"])
    return meta


class Checkpointer:
    """Owns ``train.save_interval``, ``keep_last`` and ``resume`` for one run.

    ``resume(model, optimizer)`` loads the checkpoint ``train.resume`` names (if any) and returns
    the step to continue from; ``maybe_save(step, ...)`` writes one every ``save_interval`` steps.
    ``meta`` (model config, layout, global batch) goes into every checkpoint and must match on
    resume.
    """

    def __init__(self, run_dir: str, save_interval: int, keep_last: int, resume: str,
                 topo, meta: dict):
        self.run_dir, self.interval, self.keep_last = run_dir, save_interval, keep_last
        self.resume_from = find_checkpoint(run_dir, resume)
        self.topo, self.meta = topo, meta
        self.last_saved: Path | None = self.resume_from
        """The newest checkpoint of this run: the one resumed from, then each one saved."""

    def resume(self, model, optimizer) -> int:
        """Load the checkpoint to resume from into ``model`` and ``optimizer``; its step, or 0."""
        path = self.resume_from
        if path is None:
            return 0
        meta = read_meta(path)
        check_compatible(meta, self.meta["model"], path)
        gbatch = self.meta["global_batch"]
        if meta.get("global_batch", gbatch) != gbatch:
            raise ValueError(f"cannot resume from {path}: it was trained with global_batch="
                             f"{meta['global_batch']}, now {gbatch}; keep the global batch")
        load_checkpoint(path, model, optimizer, self.topo)
        return meta["step"]

    def should_save(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def save(self, step: int, model, optimizer) -> Path | None:
        """Collective: every rank calls it."""
        path = save_checkpoint(self.run_dir, step, model, optimizer, self.topo,
                               {**self.meta, "samples_consumed": step * self.meta["global_batch"]},
                               keep_last=self.keep_last)
        self.last_saved = Path(self.run_dir) / "checkpoints" / f"step_{step:08d}"
        return path
