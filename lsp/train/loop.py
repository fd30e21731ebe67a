"""The training loop, run on every rank once the process group exists.

    summary = train(run, layout)   # run: a validated lsp.train.config.RunConfig

It reads as a list: :class:`Trainer` builds the run (topology, model, optimizer, data and the
collaborators), then for each step ``train_step`` runs ``accum`` micro-batches (this DP rank's
samples, this CP rank's contiguous slice of each) forward under bf16 autocast on GPU and backward
of the rank's loss share, sums gradients over the ranks that share each parameter
(``lsp.parallel.grads.reduce_gradients``), clips the global gradient norm and steps AdamW with
linear warmup and cosine decay. Each collaborator owns its interval: the step meter and the
logger (``log_interval``), the evaluator (``eval_interval``), the checkpointer (``save_interval``,
resume), the profiler (``profile_step``) and the watchdog (``watchdog_s``).

Optimizer: ``torch.optim.AdamW`` on every rank (fused on CUDA). megatron's DistributedOptimizer
shards optimizer state over data-parallel ranks only, and the layouts lsp targets first (CP over
all GPUs, DP = 1) have nothing to shard; it is not wired in yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lsp.data.loader import IGNORE_INDEX, WindowSampler
from lsp.data.sources import build_samples
from lsp.train.checkpoint import Checkpointer
from lsp.train.config import RunConfig, RunLayout
from lsp.train.evaluate import Evaluator
from lsp.train.meter import StepMeter
from lsp.train.metrics import RunLogger
from lsp.train.profiler import StepProfiler
from lsp.train.schedule import lr_at


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


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm of a step is not finite. Raised before the optimizer step
    on every rank alike (both are global values), so the weights stay finite and no checkpoint
    with them is written; the last checkpoint is the last good state."""


@dataclass
class StepResult:
    """What one optimizer step reports (global values)."""

    loss: float
    aux_loss: float
    lr: float
    grad_norm: float


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast(device.type, enabled=False)


class Trainer:
    """One rank's training run: built from a validated config, then :meth:`fit`."""

    def __init__(self, run: RunConfig, layout: RunLayout):
        from lsp.layers import ParallelContext
        from lsp.model import DecoderLM
        from lsp.parallel.topology import init_topology
        from lsp.train.recompute import apply_activation_checkpointing

        self.run, self.layout = run, layout
        tr, par = run.train, run.parallel
        self.rank = dist.get_rank()
        self.samples = build_samples(run.data, tr.seq_len, run.seed, "train")
        self.run_dir = Path(run.run_dir)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend() == "nccl" else torch.device("cpu"))
        self.precision = tr.precision if tr.precision != "auto" else (
            "bf16" if self.device.type == "cuda" else "fp32")
        self.autocast = _autocast(self.device, self.precision)

        self.topo = topo = init_topology(par.tp, par.cp, par.ep)
        self.meter = StepMeter(run.model, tr.seq_len, layout.global_batch * tr.seq_len,
                               layout.world, self.device, par.cp)
        self.ctx = ParallelContext(
            topo, sp_method=par.sp_method, backend=par.op_backend,
            attention_load_balance=par.attention_load_balance,
            attention_balance_overlap=par.attention_balance_overlap,
            exchange_timer=self.meter.exchange_timer,
            ablate_incoming_state=par.ablate_incoming_state)
        self.model = DecoderLM(run.model, self.ctx).to(self.device)
        if par.activation_checkpointing:
            apply_activation_checkpointing(self.model, par.checkpoint_save_attention,
                                           par.offload_checkpoints)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tr.lr, betas=(tr.beta1, tr.beta2), eps=tr.eps,
            weight_decay=tr.weight_decay, fused=self.device.type == "cuda")

        meta = {"model": dataclasses.asdict(run.model),
                "layout": {"tp": par.tp, "cp": par.cp, "ep": par.ep, "dp": layout.dp},
                "global_batch": layout.global_batch}
        self.checkpointer = Checkpointer(run.run_dir, tr.save_interval, tr.keep_last, tr.resume,
                                         topo, meta)
        self.start_step = self.checkpointer.resume(self.model, self.optimizer)
        self.sampler = WindowSampler(self.samples, tr.micro_batch, topo.dp_rank, layout.dp,
                                     layout.accum)
        self.evaluator = Evaluator(run, topo, self.device, self.autocast)
        self.profiler = StepProfiler(tr.profile_step, self.run_dir, self.rank, self.device)
        self.logger = RunLogger(str(self.run_dir), enabled=self.rank == 0,
                                tensorboard=run.log.tensorboard, resume_step=self.start_step)
        self.deadline = None
        if layout.world > 1:  # parallel.timeout_s: a rank stuck in a step ends the job
            from lsp.train.watchdog import StepWatchdog

            self.deadline = StepWatchdog(par.timeout_s, f" (rank {self.rank})", fatal=True,
                                         what=f"parallel.timeout_s={par.timeout_s:g} s")
        self.watchdog = None
        if tr.watchdog_s:  # a step slower than this prints every thread's stack (hangs)
            from lsp.train.watchdog import StepWatchdog

            self.watchdog = StepWatchdog(tr.watchdog_s, f" (rank {self.rank})")
        if self.rank == 0:
            self._announce()

    def _announce(self) -> None:
        run, par = self.run, self.run.parallel
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(run.to_yaml())
        if self.checkpointer.resume_from is not None:
            print(f"resumed from {self.checkpointer.resume_from} at step {self.start_step}",
                  flush=True)
        params = sum(p.numel() for p in self.model.parameters()) * max(par.tp, 1)
        print(f"lsp-train: {self.topo.describe()} | world {self.layout.world} | model "
              f"{run.model.pattern} {params / 1e6:.1f}M (upper bound) | seq {run.train.seq_len} "
              f"| {self.precision} | sp {par.sp_method}", flush=True)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step (0-based ``step``): micro-batches, gradient sum, clip, AdamW."""
        from lsp.parallel.grads import reduce_gradients

        tr, model, topo = self.run.train, self.model, self.topo
        accum = self.layout.accum
        lr = lr_at(step, lr=tr.lr, min_lr=tr.min_lr, warmup_steps=tr.warmup_steps,
                   total_steps=tr.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # the losses add up on the device (float64, as Python floats would) and are read
        # together with the gradient norm: one host sync per step, which also checks them
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for m in range(accum):
            batch = self.sampler.micro_batch_at(step, m, topo.cp_rank, topo.cp).to(self.device)
            loss_mask = ((batch.labels != IGNORE_INDEX).float()
                         if self.run.data.kind == "mqar" else None)
            with self.autocast():
                out = model(batch.input_ids, batch.labels, loss_mask=loss_mask,
                            cu_seqlens=batch.cu_seqlens)
            self.profiler.mark_forward(m)
            (out.loss / accum).backward()
            sums[0] += out.lm_loss.detach().double() / accum
            if out.aux_loss is not None:
                sums[1] += out.aux_loss.detach().double() / accum
        reduce_gradients(model, topo)
        gnorm = global_grad_norm(model, topo)
        lm_loss, aux_loss, gnorm_value = torch.cat([sums, gnorm.double().view(1)]).tolist()
        self._check_finite(step + 1, lm_loss=lm_loss, aux_loss=aux_loss, grad_norm=gnorm_value)
        if tr.clip_grad > 0:
            coef = (tr.clip_grad / (gnorm + 1e-6)).clamp(max=1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(lm_loss, aux_loss, lr, gnorm_value)

    def _check_finite(self, done: int, **values: float) -> None:
        """Stop before the optimizer step when a (global) loss or gradient norm is not finite."""
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if not bad:
            return
        names = {"lm_loss": "the loss", "aux_loss": "the auxiliary (MoE) loss",
                 "grad_norm": "the gradient norm"}
        what = ", ".join(f"{names[k]} is {v}" for k, v in bad.items())
        last = self.checkpointer.last_saved
        kept = (f"the last checkpoint ({last}) holds the last good state" if last
                else "no checkpoint was written")
        raise NonFiniteError(
            f"lsp-train: step {done}: {what} (not finite); stopped before the optimizer step, so "
            f"no weights were updated with it and {kept}. Look for the cause (learning rate, "
            "data, precision), then resume from the checkpoint or start again")

    def _watch(self, step: int):
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.watching(step)

    def _within_deadline(self, step):
        """The iteration (step, logging, evaluation, checkpoint) must end within
        ``parallel.timeout_s`` or the rank dumps its stacks and exits (see ParallelConfig)."""
        if self.deadline is None:
            return contextlib.nullcontext()
        return self.deadline.watching(step)

    def fit(self) -> dict | None:
        """Train from the resumed step to ``stop_after_step`` (or ``steps``); rank 0 returns the
        summary it also writes to ``run_dir/summary.json``."""
        tr = self.run.train
        history = []
        stop_at = min(tr.steps, tr.stop_after_step or tr.steps)
        self.meter.restart()
        try:
            for step in range(self.start_step, stop_at):
                done = step + 1
                with self._within_deadline(done):
                    self._iteration(step, done, history)
            with self._within_deadline("end (summary and final barrier)"):
                return self._finish(history)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the collaborators' threads and files and tear the topology down; runs however
        the run ends (an error too), so a process that trains again starts clean."""
        from lsp.parallel.topology import destroy_topology

        self.logger.close()
        for thread in (self.watchdog, self.deadline):
            if thread is not None:
                thread.close()
        destroy_topology()

    def _iteration(self, step: int, done: int, history: list) -> None:
        tr = self.run.train
        # the ranks check that their sequence-parallel calls agree on the first step only:
        # shapes are static from then on, and the check is a collective (a host sync on NCCL)
        with self._watch(done), self.profiler.around(done), \
                self.ctx.sp_checks(step == self.start_step):
            result = self.train_step(step)
        self.meter.step_done()
        if done % tr.log_interval == 0 or done == tr.steps:
            row = {"loss": result.loss, "aux_loss": result.aux_loss, "lr": result.lr,
                   "grad_norm": result.grad_norm, **self.meter.row()}
            if self.evaluator.should_evaluate(done):
                row.update(self.evaluator.evaluate(self.model))
            history.append({"step": done, **row})
            self.logger.log(done, row)
            self.meter.restart()
        if self.checkpointer.should_save(done):
            self.checkpointer.save(done, self.model, self.optimizer)
            self.meter.restart()  # keep checkpoint time out of the step timing

    def _finish(self, history: list) -> dict | None:
        summary = None
        if self.rank == 0:
            dev = self.device
            summary = {"name": self.run.name, "steps": len(history) and history[-1]["step"],
                       "history": history, "world": self.layout.world,
                       "layout": self.checkpointer.meta["layout"],
                       "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                       "flops_per_token": self.meter.flops_per_token}
            path = self.run_dir / "summary.json"
            path.with_suffix(".tmp").write_text(json.dumps(summary, indent=1))
            os.replace(path.with_suffix(".tmp"), path)
        dist.barrier()
        return summary


def train(run: RunConfig, layout: RunLayout | None = None) -> dict | None:
    """Run the configured training on this rank; rank 0 returns a summary dict."""
    from lsp.parallel.topology import destroy_topology

    try:
        trainer = Trainer(run, layout or run.resolve(dist.get_world_size()))
    except BaseException:  # e.g. a checkpoint that does not fit: leave no topology behind
        destroy_topology()
        raise
    return trainer.fit()
