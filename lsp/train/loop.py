"""The training loop: one readable function, run on every rank after the process group exists.

    summary = train(cfg)   # cfg: the resolved Hydra config (configs/)

Per optimizer step: ``accum`` micro-batches (this DP rank's samples, this CP rank's contiguous
slice of each), forward under bf16 autocast on GPU, backward of the rank's loss share, gradient
sum over the ranks that share each parameter (``lsp.parallel.grads.reduce_gradients``), global
gradient-norm clipping, AdamW with linear warmup and cosine decay. Rank 0 logs a progress line,
TensorBoard scalars and ``metrics.jsonl`` every ``log_interval`` steps; checkpoints every
``save_interval`` steps (``lsp.train.checkpoint``), resumed automatically from the run dir.

Optimizer: ``torch.optim.AdamW`` on every rank (fused on CUDA). megatron's DistributedOptimizer
shards optimizer state over data-parallel ranks only, and the layouts lsp targets first (CP over
all GPUs, DP = 1) have nothing to shard; it is not wired in yet.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from lsp.data.loader import IGNORE_INDEX, StreamSamples, WindowSampler
from lsp.train import checkpoint as ckpt
from lsp.train.flops import peak_tflops, train_flops_per_token
from lsp.train.metrics import RunLogger
from lsp.train.schedule import lr_at


def build_samples(data_cfg, seq_len: int, seed: int, split: str = "train"):
    """Sample source ``j -> (input_ids, labels)`` for the configured data kind."""
    kind = data_cfg.kind
    if data_cfg.get("reset_state_at_document_boundaries", False):
        raise ValueError(
            "data.reset_state_at_document_boundaries=true needs document boundaries (cu_seqlens) "
            "in the ops and across ranks, which lsp does not support yet; set it to false to "
            "train across document boundaries as Megatron's GPT datasets do"
        )
    if kind == "stdlib":
        from lsp.data.corpus import StdlibCorpus

        stream = StdlibCorpus(split, valid_percent=data_cfg.get("valid_percent", 2.0),
                              root=data_cfg.get("root"), max_bytes=data_cfg.get("max_bytes"))
        return StreamSamples(stream, seq_len, seed)
    if kind == "megatron":
        from lsp.data.indexed import MegatronIndexedStream

        path = data_cfg.path  # validate_config has checked that it is set
        prefix = path if split == "train" else data_cfg.get("valid_path") or path
        return StreamSamples(MegatronIndexedStream(prefix, data_cfg.vocab_size), seq_len,
                             seed + (0 if split == "train" else 1))
    if kind == "mqar":
        from lsp.data.mqar import MQAR

        task = MQAR(seq_len, data_cfg.num_pairs, data_cfg.vocab_size,
                    seed=seed + (0 if split == "train" else 10_000_019))
        task.vocab_size = data_cfg.vocab_size
        return task
    raise ValueError(f"data.kind={kind!r} is unknown; choose stdlib, megatron or mqar")


def _attention_ops():
    aten = torch.ops.aten
    return {getattr(aten, n).default for n in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
        if hasattr(aten, n)}


def _save_attention_context():
    """Selective checkpointing (torch's SAC): keep the softmax attention kernel's outputs (output
    and log-sum-exp, ~1 GB per layer at 512K tokens a GPU) and recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = _attention_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _offload_hooks():
    """Saved-tensor hooks that move what they save to host memory (pinned on CUDA)."""
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def _offloaded_checkpoint(fn, x):
    """torch's reentrant checkpoint keeps its input through ``save_for_backward``, so the
    offload hooks move it to host memory until the block's backward brings it back; the block
    itself runs without saving anything in forward."""
    with _offload_hooks():
        return checkpoint(fn, x, use_reentrant=True)


def replay_routing(fn, replays):
    """``fn`` (a block's forward) wrapped for checkpointing: a fresh function per call that
    records each MoE router's top-k choice when first run and replays it when run again (the
    recomputation in backward), through megatron-core's ``RouterReplay``.

    Without it the recomputation chooses experts anew, and a near tie that an ulp of difference
    flips (1M tokens x 8 experts has many) changes the tokens per expert: torch's checkpoint
    then fails with "Recomputed values ... have different metadata", and a reentrant
    checkpoint would silently backpropagate through a routing the forward never used. The replay keeps the forward's experts; their
    weights are recomputed from the router's logits as usual (``lsp.layers.ffn.
    checkpoint_routing_replay``).
    """
    from megatron.core.transformer.moe.router_replay import RouterReplayAction as Act

    def fresh():
        recorded = []

        def run(x):
            again = bool(recorded)
            for i, r in enumerate(replays):
                r.clear_indices()
                if again:
                    r.set_target_indices(recorded[i])
                r.set_router_replay_action(Act.REPLAY_BACKWARD if again else Act.RECORD)
            try:
                out = fn(x)
                if not again:
                    recorded.extend(r.get_recorded_indices() for r in replays)
            finally:
                for r in replays:
                    r.clear_indices()
                    r.clear_router_replay_action()
            return out

        return run

    return fresh


def apply_activation_checkpointing(model, save_attention: bool = True,
                                   offload: bool = False) -> None:
    """Recompute each block in backward instead of keeping its activations (from outside).

    ``early_stop=False``: the recomputation runs the whole block, so that code after the last
    saved tensor (``MoEFFN`` dropping the graph references megatron's dispatcher keeps) runs too;
    with early stop the recomputed graph of every block stayed alive to the end of the step.
    ``save_attention``: in softmax-attention blocks keep the attention kernel's outputs rather
    than run it again: at long context it is the most expensive op of the model (quadratic), and
    recomputing it cost one more attention forward per layer and step.
    ``offload``: keep each block's input (what checkpointing retains: 1 GB per block at 512K
    tokens and hidden 1024 in bf16) in host memory, copied back for the block's backward; the
    blocks whose attention outputs are kept stay on the device.

    Blocks with MoE feed-forwards replay the forward's routing in the recomputation
    (:func:`replay_routing`).
    """
    from lsp.layers import SoftmaxAttention
    from lsp.layers.ffn import MoEFFN

    for block in model.blocks:
        # a block without MoE gets an empty list: nothing to record or replay
        replays = [m.moe.router.router_replay for m in block.modules() if isinstance(m, MoEFFN)]
        fresh = replay_routing(block.forward, replays)
        keep_attention = save_attention and isinstance(block.mixer, SoftmaxAttention)
        if offload and not keep_attention:
            block.forward = lambda x, _n=fresh: _offloaded_checkpoint(_n(), x)
            continue
        kw = dict(use_reentrant=False, early_stop=False)
        if keep_attention:
            kw["context_fn"] = _save_attention_context
        block.forward = lambda x, _n=fresh, _kw=kw: checkpoint(_n(), x, **_kw)


def global_grad_norm(model, topo) -> torch.Tensor:
    """L2 norm of the whole model's gradient, each shared parameter counted once.

    After ``reduce_gradients`` a gradient is identical on the ranks that share the parameter:
    experts over the expert-data-parallel group, the rest over DP x CP, and parameters that are
    whole on every TP rank over TP as well; the first of those ranks contributes it.
    """
    from lsp.parallel.grads import is_expert_param, is_tp_replicated

    dev = next(model.parameters()).device
    sq = torch.zeros((), dtype=torch.float64, device=dev)
    dpcp = dist.get_rank(topo.dp_cp_group)
    edp = dist.get_rank(topo.expt_dp_group)
    for p in model.parameters():
        if p.grad is None:
            continue
        if is_expert_param(p):
            own = edp == 0
        elif is_tp_replicated(p):
            own = dpcp == 0 and topo.tp_rank == 0
        else:
            own = dpcp == 0
        if own:
            sq += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq)
    return sq.sqrt()


def _start_profiler(device):
    """torch.profiler over one whole optimizer step (``train.profile_step``)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    prof = torch.profiler.profile(activities=acts, profile_memory=True)
    if device.type == "cuda":
        prof.lsp_marks = [f"step start: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB "
                          "allocated (weights, gradients, optimizer state)"]
    prof.__enter__()
    return prof


def _finish_profiler(prof, run_dir: Path, rank: int, device, step: int) -> None:
    """Write ``profile_rank<r>.txt``: ops by device time, by CPU time and by memory allocated,
    and the step's peak memory; blocks appear as ``block<i>_<letter>`` ranges (recomputation
    under activation checkpointing shows as a second range of the same name)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prof.__exit__(None, None, None)
    ka = prof.key_averages()
    dev_key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    parts = [f"profile of step {step}, rank {rank}, device {device}"]
    if device.type == "cuda":
        parts += getattr(prof, "lsp_marks", [])
        parts.append(f"peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB, "
                     f"peak reserved {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB")
    for key, n in ((dev_key, 60), ("cpu_time_total", 30), ("self_device_memory_usage"
                   if device.type == "cuda" else "self_cpu_memory_usage", 40)):
        try:
            parts.append(f"--- sorted by {key}\n" + ka.table(sort_by=key, row_limit=n,
                                                               max_name_column_width=60))
        except Exception as e:  # a sort key this torch version lacks
            parts.append(f"--- sorted by {key}: unavailable ({e})")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"profile_rank{rank}.txt").write_text("\n\n".join(parts))
    if rank == 0:
        print(f"profile of step {step} written to {run_dir}/profile_rank*.txt", flush=True)


def _peak_mem_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host RSS (KiB on Linux)


def _peak_mem_per_rank(device) -> list[float]:
    """Every rank's peak memory (GiB), gathered: under CP the ranks differ (the last rank's
    softmax attention sees the most keys), and the target is per GPU."""
    mine = torch.tensor([_peak_mem_gb(device)], dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [round(float(t), 3) for t in parts]


@torch.no_grad()
def evaluate(model, samples, cfg, topo, device, autocast) -> dict:
    """Validation loss (stream data) or recall accuracy (MQAR) on held-out samples."""
    from lsp.data.mqar import accuracy

    model.eval()
    tr = cfg.train
    sampler = WindowSampler(samples, tr.micro_batch, topo.dp_rank, topo.dp)
    loss_sum, n, correct, total = 0.0, 0, 0, 0
    for i in range(tr.eval_batches):
        b = sampler.micro_batch_at(i, 0, topo.cp_rank, topo.cp).to(device)
        with autocast():
            if cfg.data.kind == "mqar":
                logits = model(b.input_ids).logits  # [T/cp, B, V/tp]
                if topo.tp > 1:
                    parts = [torch.empty_like(logits) for _ in range(topo.tp)]
                    dist.all_gather(parts, logits.contiguous(), group=topo.tp_group)
                    logits = torch.cat(parts, dim=-1)
                c, t = accuracy(logits.transpose(0, 1).float(), b.labels)
                correct, total = correct + c, total + t
            else:
                out = model(b.input_ids, b.labels)
                loss_sum, n = loss_sum + float(out.lm_loss), n + 1
    model.train()
    if cfg.data.kind == "mqar":
        ct = torch.tensor([correct, total], dtype=torch.float64, device=device)
        dist.all_reduce(ct, group=topo.dp_cp_group)
        return {"accuracy": float(ct[0] / ct[1].clamp(min=1))}
    return {"valid_loss": loss_sum / max(n, 1)}


def validate_config(cfg, world: int):
    """Every configuration error, before any collective (and before processes are spawned).

    Returns ``(model dict, ModelConfig, dp, global batch, accumulation steps)``.
    """
    from omegaconf import OmegaConf

    from lsp.model import ModelConfig, check_config
    from lsp.parallel.topology import check_layout

    tr, par = cfg.train, cfg.parallel
    model_dict = OmegaConf.to_container(cfg.model, resolve=True)
    mcfg = ModelConfig.from_dict(model_dict)
    dp = check_layout(world, par.tp, par.cp, par.ep)
    check_config(mcfg, tp=par.tp, cp=par.cp, ep=par.ep, seq_length=tr.seq_len,
                 sp_method=par.sp_method)
    if mcfg.vocab_size < cfg.data.vocab_size:
        raise ValueError(f"model.vocab_size={mcfg.vocab_size} is smaller than the data's "
                         f"vocabulary {cfg.data.vocab_size}; raise model.vocab_size")
    if cfg.data.get("reset_state_at_document_boundaries", False):
        build_samples(cfg.data, tr.seq_len, cfg.seed)  # raises the explanation
    on_gpu = par.dist_backend == "nccl" or (par.dist_backend == "auto"
                                            and torch.cuda.is_available())
    if mcfg.conv_backend == "triton" and not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("model.conv_backend=triton runs on GPUs (or under TRITON_INTERPRET=1); "
                         "this run is on CPU ranks: use model.conv_backend=torch")
    if cfg.data.kind == "megatron" and not cfg.data.get("path"):
        raise ValueError("data.kind=megatron needs data.path=<prefix of a .bin/.idx pair>")
    micro, gbatch = tr.micro_batch, tr.get("global_batch") or tr.micro_batch * dp
    if gbatch % (micro * dp):
        raise ValueError(f"train.global_batch={gbatch} is not divisible by micro_batch x dp = "
                         f"{micro} x {dp}; choose a multiple of {micro * dp}")
    return model_dict, mcfg, dp, gbatch, gbatch // (micro * dp)


def train(cfg) -> dict | None:
    """Run the configured training on this rank; rank 0 returns a summary dict."""
    from omegaconf import OmegaConf

    from lsp.layers import ParallelContext
    from lsp.model import DecoderLM
    from lsp.parallel import sequence as sp_mod
    from lsp.parallel.grads import reduce_gradients
    from lsp.parallel.topology import init_topology

    tr, par = cfg.train, cfg.parallel
    rank, world = dist.get_rank(), dist.get_world_size()
    model_dict, mcfg, dp, gbatch, accum = validate_config(cfg, world)
    micro = tr.micro_batch
    samples = build_samples(cfg.data, tr.seq_len, cfg.seed, "train")
    run_dir = Path(cfg.run_dir)

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    precision = tr.precision if tr.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision={precision!r}; choose auto, bf16 or fp32")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" \
        else (lambda: torch.autocast(device.type, enabled=False))

    topo = init_topology(par.tp, par.cp, par.ep)
    ctx = ParallelContext(topo, sp_method=par.sp_method, backend=par.get("op_backend", "auto"),
                          cp_attention_balance=par.get("attention_load_balance", False),
                          cp_attention_overlap=par.get("attention_balance_overlap", False))
    model = DecoderLM(mcfg, ctx).to(device)
    if par.activation_checkpointing:
        apply_activation_checkpointing(model, par.get("checkpoint_save_attention", True),
                                       par.get("offload_checkpoints", False))
    opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=(tr.beta1, tr.beta2),
                            eps=tr.eps, weight_decay=tr.weight_decay,
                            fused=device.type == "cuda")
    start_step, meta_common = 0, {"model": model_dict, "layout": {"tp": par.tp, "cp": par.cp,
                                                                  "ep": par.ep, "dp": dp}}
    resume_from = ckpt.find_checkpoint(str(run_dir), tr.resume)
    if resume_from is not None:
        meta = ckpt.read_meta(resume_from)
        ckpt.check_compatible(meta, model_dict, resume_from)
        if meta.get("global_batch", gbatch) != gbatch:
            raise ValueError(f"cannot resume from {resume_from}: it was trained with global_batch="
                             f"{meta['global_batch']}, now {gbatch}; keep the global batch")
        ckpt.load_checkpoint(resume_from, model, opt, topo)
        start_step = meta["step"]
    sampler = WindowSampler(samples, micro, topo.dp_rank, dp, accum)
    logger = RunLogger(str(run_dir), enabled=rank == 0, tensorboard=cfg.log.tensorboard)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if resume_from is not None:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
        print(f"lsp-train: {topo.describe()} | world {world} | model {mcfg.pattern} "
              f"{sum(p.numel() for p in model.parameters()) * (par.tp if par.tp > 1 else 1) / 1e6:.1f}M "
              f"(upper bound) | seq {tr.seq_len} | {precision} | sp {par.sp_method}", flush=True)

    flops_tok = train_flops_per_token(mcfg, tr.seq_len)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tokens_per_step = gbatch * tr.seq_len
    sp_mod.exchange_timer.enabled = par.cp > 1
    stop_at = tr.get("stop_after_step") or tr.steps
    history = []
    eval_samples = None
    t_last, steps_since = time.perf_counter(), 0
    sp_mod.exchange_timer.reset()
    profile_step = tr.get("profile_step")
    watchdog = None
    if tr.get("watchdog_s"):  # a step slower than this prints every thread's stack (hangs)
        from lsp.train.watchdog import StepWatchdog

        watchdog = StepWatchdog(tr.watchdog_s, f" (rank {rank})")
    for step in range(start_step, min(tr.steps, stop_at)):
        if watchdog is not None:
            watchdog.arm(step + 1)
        prof = None
        if profile_step is not None and step + 1 == profile_step:
            prof = _start_profiler(device)
        lr = lr_at(step, lr=tr.lr, min_lr=tr.min_lr, warmup_steps=tr.warmup_steps,
                   total_steps=tr.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        lm_loss = aux_loss = 0.0
        for m in range(accum):
            batch = sampler.micro_batch_at(step, m, topo.cp_rank, topo.cp).to(device)
            with autocast():
                out = model(batch.input_ids, batch.labels,
                            loss_mask=(batch.labels != IGNORE_INDEX).float()
                            if cfg.data.kind == "mqar" else None)
            if prof is not None and device.type == "cuda":
                prof.lsp_marks = getattr(prof, "lsp_marks", []) + [
                    f"micro-batch {m}: after forward {torch.cuda.memory_allocated(device) / 2**30:.2f}"
                    f" GiB allocated, forward peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"]
            (out.loss / accum).backward()
            lm_loss += float(out.lm_loss) / accum
            aux_loss += (0.0 if out.aux_loss is None else float(out.aux_loss)) / accum
        reduce_gradients(model, topo)
        gnorm = global_grad_norm(model, topo)
        if tr.clip_grad and tr.clip_grad > 0:
            coef = (tr.clip_grad / (gnorm + 1e-6)).clamp(max=1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if prof is not None:
            _finish_profiler(prof, run_dir, rank, device, step + 1)
        # the first step has checked on every rank that the SP calls agree (shapes, methods);
        # shapes are static from here on, so drop that per-call collective (a host sync on NCCL)
        ctx.sp_check = False
        if watchdog is not None:
            watchdog.disarm()
        steps_since += 1
        done = step + 1
        if done % tr.log_interval == 0 or done == tr.steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t_last
            step_time = elapsed / steps_since
            exch = sp_mod.exchange_timer.seconds() / steps_since
            tps = tokens_per_step / step_time
            per_rank = _peak_mem_per_rank(device)
            row = {"loss": lm_loss, "aux_loss": aux_loss, "lr": lr, "grad_norm": float(gnorm),
                   "step_time_s": step_time, "tokens_per_s": tps,
                   "mfu": None if peak is None else tps * flops_tok / (peak * 1e12 * world),
                   "exchange_share": exch / step_time if par.cp > 1 else 0.0,
                   "peak_mem_gb": max(per_rank), "peak_mem_gb_per_rank": per_rank}
            if tr.eval_interval and (done % tr.eval_interval == 0 or done == tr.steps):
                if eval_samples is None:
                    eval_samples = build_samples(cfg.data, tr.seq_len, cfg.seed, "valid")
                row.update(evaluate(model, eval_samples, cfg, topo, device, autocast))
            history.append({"step": done, **row})
            logger.log(done, row)
            t_last, steps_since = time.perf_counter(), 0
            sp_mod.exchange_timer.reset()
        if tr.save_interval and done % tr.save_interval == 0:
            ckpt.save_checkpoint(str(run_dir), done, model, opt, topo,
                                 {**meta_common, "global_batch": gbatch,
                                  "samples_consumed": done * gbatch}, keep_last=tr.keep_last)
            t_last = time.perf_counter()  # keep checkpoint time out of the step timing
    logger.close()
    if watchdog is not None:
        watchdog.close()
    summary = None
    if rank == 0:
        summary = {"name": cfg.name, "steps": len(history) and history[-1]["step"],
                   "history": history, "world": world, "layout": meta_common["layout"],
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "flops_per_token": flops_tok}
        path = run_dir / "summary.json"
        path.with_suffix(".tmp").write_text(json.dumps(summary, indent=1))
        os.replace(path.with_suffix(".tmp"), path)
    dist.barrier()
    from lsp.parallel.topology import destroy_topology

    destroy_topology()
    return summary
