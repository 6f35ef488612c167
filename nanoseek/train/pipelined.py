"""Pretraining through a pipeline (`nanoseek train --pp N`): the loss split over the stages.

The last stage computes the main cross-entropy and the MTP cross-entropies from its outputs (the pipeline's loss
function); every stage adds the balance term of its own MoE layers from inside (its share of the mean over all
the model's MoE layers, MTP blocks included, as the single-process loss has it; nanoseek/dist/pipeline.py). Both
are divided by grad_accum, as the single-process micro-batch losses are, and the schedule averages over its
micro-batches. The values are recorded as they are computed and summed over the pipeline and averaged over the
data-parallel ranks for the metrics, so a row reads as the single-process one.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..dist.pipeline import forward_only
from .balance import RoutingRecorder, batch_aux_loss, sequence_balance_loss
from .config import TrainConfig


class PipelinedPretraining:
    """The pretraining objective on a pipelined run's stages (`run.parallel.stages`); builds the schedule."""

    def __init__(self, cfg: TrainConfig, parallel, n_moe_layers: int, has_mtp: bool):
        self.cfg, self.parallel, self.n_moe_layers, self.has_mtp = cfg, parallel, n_moe_layers, has_mtp
        self.lam, self.scale = 0.0, 1.0 / cfg.grad_accum
        self.parts: list[tuple[float, float | None]] = []   # (lm, mtp) per micro-batch, last stage
        self.aux: list[float] = []                           # balance term per micro-batch and local stage
        for _, stage in parallel.stages:
            stage.aux_loss = functools.partial(self._balance, RoutingRecorder(stage))
        parallel.build_pipeline(cfg.microbatches, cfg.batch_size // parallel.dims.dp, cfg.seq_len, self._loss)

    def _balance(self, recorder: RoutingRecorder, batch_size: int) -> torch.Tensor | None:
        routing, cfg = recorder.take(), self.cfg
        if not routing:                                      # eval mode records nothing
            return None
        if cfg.balance == "aux_free" and cfg.seq_aux_alpha > 0:
            term = sequence_balance_loss(routing, batch_size, cfg.seq_aux_alpha)
        elif cfg.balance == "aux_loss":
            term = batch_aux_loss(routing, cfg.aux_loss_alpha)
        else:
            return None
        term = term * (len(routing) / self.n_moe_layers) * self.scale
        self.aux.append(term.item())
        return term

    def _loss(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        logits, *mtp = outputs
        lm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss, mtp_loss = lm, None
        if mtp and self.lam > 0:
            mtp_loss = torch.stack([F.cross_entropy(m.flatten(0, 1).float(), labels[:, k:].flatten())
                                    for k, m in enumerate(mtp, start=1)]).mean()
            loss = loss + self.lam * mtp_loss                # (lambda / D) * sum_k L_MTP^k
        self.parts.append((lm.item(), None if mtp_loss is None else mtp_loss.item()))
        return loss * self.scale

    def step(self, run, batches, lam: float) -> dict[str, float] | None:
        """Forward and backward of every micro-batch (global batches; this rank takes its rows); the metrics'
        loss parts, or None when a loss was not finite (the run then drops the step)."""
        parallel, n = self.parallel, self.parallel.n_microbatches
        self.lam, self.parts, self.aux = lam, [], []
        for batch in batches:
            parallel.pipeline_step(parallel.rows(batch.input_ids.to(run.device)),
                                   parallel.rows(batch.labels.to(run.device)))
            finite = torch.tensor(float(all(map(_finite, (v for p in self.parts for v in p if v is not None)))))
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite:
                run.drop_step()
                return None
        lm = sum(p[0] for p in self.parts) / n * self.scale
        mtp = sum(p[1] for p in self.parts if p[1] is not None) / n * self.scale
        totals = parallel.mean_over_dp({"lm_loss": lm, "mtp_loss": mtp, "balance_loss": sum(self.aux) / n})
        run.bad_steps = 0
        row = {"loss": totals["lm_loss"] + lam * totals["mtp_loss"] + totals["balance_loss"],
               "lm_loss": totals["lm_loss"]}
        if lam > 0 and self.has_mtp:
            row["mtp_loss"] = totals["mtp_loss"]
        row["balance_loss"] = totals["balance_loss"]
        return row

    @torch.no_grad()
    def validation_loss(self, run, batches) -> float:
        """Mean main-head loss over the validation batches, through the pipeline stage after stage (forward
        only), averaged over the data-parallel ranks."""
        parallel = self.parallel
        for _, stage in parallel.stages:
            stage.eval()
        losses = []
        for batch in batches:
            ids, labels = (parallel.rows(t.to(run.device)) for t in (batch.input_ids, batch.labels))
            hidden = torch.empty(*ids.shape, run.model.cfg.hidden_size, device=run.device,
                                 dtype=next(run.modules[0].parameters()).dtype)
            out = forward_only(parallel.stages, parallel.dims, parallel.pp_rank, parallel.pp_group, ids, hidden)
            if out is not None:
                losses.append(F.cross_entropy(out[0].flatten(0, 1).float(), labels.flatten()).item())
        mean = sum(losses) / len(losses) if losses else 0.0
        return parallel.mean_over_dp({"val": mean})["val"]


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")
