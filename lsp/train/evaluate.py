"""The evaluator: validation loss (stream data) or recall accuracy (MQAR) at its interval."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lsp.data.loader import WindowSampler
from lsp.data.sources import build_samples


class Evaluator:
    """Owns ``train.eval_interval``: every N steps and at the last step (0: never)."""

    def __init__(self, run, topo, device: torch.device, autocast):
        self.run, self.topo, self.device, self.autocast = run, topo, device, autocast
        self.interval, self.last = run.train.eval_interval, run.train.steps
        self._samples = None

    def should_evaluate(self, step: int) -> bool:
        return bool(self.interval) and (step % self.interval == 0 or step == self.last)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """``{"valid_loss": ...}`` or ``{"accuracy": ...}``; a collective over DP x CP."""
        from lsp.data.mqar import accuracy

        run, topo = self.run, self.topo
        if self._samples is None:
            self._samples = build_samples(run.data, run.train.seq_len, run.seed, "valid")
        mqar = run.data.kind == "mqar"
        model.eval()
        sampler = WindowSampler(self._samples, run.train.micro_batch, topo.dp_rank, topo.dp)
        loss_sum, n, correct, total = 0.0, 0, 0, 0
        for i in range(run.train.eval_batches):
            b = sampler.micro_batch_at(i, 0, topo.cp_rank, topo.cp).to(self.device)
            with self.autocast():
                if mqar:
                    logits = model(b.input_ids, cu_seqlens=b.cu_seqlens).logits  # [T/cp, B, V/tp]
                    if topo.tp > 1:
                        parts = [torch.empty_like(logits) for _ in range(topo.tp)]
                        dist.all_gather(parts, logits.contiguous(), group=topo.tp_group)
                        logits = torch.cat(parts, dim=-1)
                    c, t = accuracy(logits.transpose(0, 1).float(), b.labels)
                    correct, total = correct + c, total + t
                else:
                    out = model(b.input_ids, b.labels, cu_seqlens=b.cu_seqlens)
                    loss_sum, n = loss_sum + float(out.lm_loss), n + 1
        model.train()
        if mqar:
            ct = torch.tensor([correct, total], dtype=torch.float64, device=self.device)
            dist.all_reduce(ct, group=topo.dp_cp_group)
            return {"accuracy": float(ct[0] / ct[1].clamp(min=1))}
        return {"valid_loss": loss_sum / max(n, 1)}
