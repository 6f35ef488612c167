"""Pipeline parallelism for pretraining with torch.distributed.pipelining (1F1B, Interleaved1F1B, ZBVZeroBubble,
DualPipeV).

The main layers are cut into `pp x stages_per_rank` contiguous stages. Every stage is a pruned copy of the
whole model (the layers of other stages replaced by parameter-less placeholders, embedding/norm/head/MTP kept
only where they run), so its parameters keep the full model's names: checkpoints written by any layout load
in any other. The first stage embeds the tokens; the last one holds the final norm, the head and the MTP
modules, and the loss (main cross-entropy + lambda x mean MTP cross-entropy) is computed there. Stages pass
(hidden state, token embeddings) along: the MTP modules need the embeddings of later tokens, so they travel
with the activations instead of the embedding being copied to the last stage (in the V layouts the first and
the last stage share rank 0 anyway).

A stage may add a term to the loss from inside (`PipelineStageModule.aux_loss`, set by the trainer: the
sequence-wise balance loss of the stage's own MoE layers): `AddAuxiliaryLoss` joins it to the stage's output
(its value unchanged, its gradient 1 x d(aux)), so no stage needs another stage's routing.

Stage -> rank: stage s on rank s % pp ("loop", 1F1B and Interleaved1F1B); for ZBVZeroBubble and DualPipeV the
"V": rank r holds stages r and 2pp-1-r, so rank 0 holds both the first and the last stage.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B,
                                          ScheduleZBVZeroBubble)

from typing import Callable

from ..config import ConfigError
from ..model import Transformer
from .mesh import ParallelDims

SCHEDULES = {"1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B, "ZBVZeroBubble": ScheduleZBVZeroBubble,
             "DualPipeV": ScheduleDualPipeV}


def default_microbatches(dims: ParallelDims) -> int:
    """The fewest micro-batches the schedule accepts: one per stage (1F1B and DualPipeV require it)."""
    return dims.pp * dims.stages_per_rank


def stage_ids(dims: ParallelDims, pp_rank: int) -> list[int]:
    """The stages pipeline rank `pp_rank` holds (see the module docstring)."""
    n = dims.pp * dims.stages_per_rank
    if dims.pp_schedule in ("ZBVZeroBubble", "DualPipeV"):
        return [pp_rank, n - 1 - pp_rank]
    return list(range(pp_rank, n, dims.pp))


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous main-layer ranges, as even as possible (earlier stages take the remainder)."""
    if n_stages > n_layers:
        raise ConfigError(f"--pp-schedule needs {n_stages} pipeline stages but the model has only {n_layers} "
                          "layers: lower --pp or pick a schedule with one stage per rank")
    size, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + size + (s < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class _Skip(nn.Module):
    """A layer held by another stage."""


class AddAuxiliaryLoss(torch.autograd.Function):
    """x unchanged forward; backward passes x's gradient through and gives `aux` the gradient 1, so the loss of
    the whole pipeline is as if aux had been added to it (scaled with it by the schedule's micro-batch mean)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_shape = aux.shape
        return x.clone()  # not a view: the split-backward schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_ones(ctx.aux_shape)


class PipelineStageModule(nn.Module):
    """Stage `index` of `n_stages`, made of the submodules of a pruned copy of the Transformer registered under the
    same attribute names (`model`, `lm_head`, `mtp`), so its parameters keep the full model's names.

    aux_loss: None, or a function of the micro-batch's row count returning a term to add to the loss (or None),
        called after the stage's layers ran (see the module docstring)."""

    def __init__(self, pruned: Transformer, layers: range, index: int, n_stages: int):
        super().__init__()
        self.cfg, self.model, self.lm_head, self.mtp = pruned.cfg, pruned.model, pruned.lm_head, pruned.mtp
        self.rotary, self.layer_ids = pruned.rotary, list(layers)
        self.first, self.last = index == 0, index == n_stages - 1
        self.aux_loss: Callable[[int], torch.Tensor | None] | None = None

    moe_layers = Transformer.moe_layers
    mtp_hidden_states = Transformer.mtp_hidden_states

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None):
        if self.first:
            emb = x = self.model.embed_tokens(x)
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = self.rotary(positions)
        for i in self.layer_ids:
            x = self.model.layers[i](x, cos, sin, positions)
        if self.last:
            h = self.model.norm(x)
            x = (self.lm_head(h), *(self.lm_head(h_k) for h_k in self.mtp_hidden_states(h, emb=emb)))
        aux = self.aux_loss(B) if self.aux_loss is not None else None
        if aux is not None:
            x = (AddAuxiliaryLoss.apply(x[0], aux), *x[1:]) if self.last else AddAuxiliaryLoss.apply(x, aux)
        # emb passes through as a copy: a stage output that is its input unchanged has no grad_fn, which the
        # schedules that split the backward (input / weight) cannot differentiate
        return x if self.last else (x, emb.clone())


def build_stages(model: nn.Module, dims: ParallelDims, pp_rank: int) -> list[tuple[int, PipelineStageModule]]:
    """This rank's (stage index, stage module) pairs, cut from a fully built `model` (left untouched)."""
    n_stages = dims.pp * dims.stages_per_rank
    cfg = model.cfg
    ranges = split_layers(cfg.num_hidden_layers, n_stages)
    out = []
    for s in stage_ids(dims, pp_rank):
        stage_model = copy.deepcopy(model)
        for i in range(cfg.num_hidden_layers):
            if i not in ranges[s]:
                stage_model.model.layers[i] = _Skip()
        if s != 0:
            stage_model.model.embed_tokens = None
        if s != n_stages - 1:
            stage_model.model.norm, stage_model.lm_head, stage_model.mtp = None, None, nn.ModuleList()
        out.append((s, PipelineStageModule(stage_model, ranges[s], s, n_stages)))
    return out


def _stage_shapes(module: PipelineStageModule, micro_batch: int, seq_len: int, device: torch.device):
    """(input_args, output_args) of a stage as meta tensors: given (with their gradients' metadata), they spare the
    stage the metadata-inference forward, whose side effects (routing counts, balance-loss records) would count a
    micro-batch twice."""
    cfg = module.cfg
    dtype = next(module.parameters()).dtype
    # requires_grad: the metadata tells the schedule which inputs and outputs carry gradients
    hidden = torch.empty(micro_batch, seq_len, cfg.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    inputs = (torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta"),) if module.first else (hidden, hidden)
    if not module.last:
        return inputs, (hidden, hidden)
    logits = [torch.empty(micro_batch, seq_len - k, cfg.vocab_size, dtype=dtype, device="meta", requires_grad=True)
              for k in range(1 + min(len(module.mtp), seq_len - 1))]
    return inputs, tuple(logits)


def build_schedule(stages: list[tuple[int, PipelineStageModule]], dims: ParallelDims, n_microbatches: int,
                   micro_batch: int, seq_len: int, loss: Callable, device: torch.device, pp_group):
    """The torch.distributed.pipelining schedule over this rank's stages, for micro-batches of `micro_batch` rows
    of `seq_len` tokens."""
    n_stages = dims.pp * dims.stages_per_rank
    pipeline_stages = []
    for s, module in stages:
        inputs, outputs = _stage_shapes(module, micro_batch, seq_len, device)
        input_grads = tuple(None if t.dtype == torch.long else t for t in inputs)  # token ids have no gradient
        output_grads = None if module.last else outputs
        pipeline_stages.append(PipelineStage(module, s, n_stages, device, input_args=inputs, output_args=outputs,
                                             input_grads=input_grads, output_grads=output_grads, group=pp_group))
    cls = SCHEDULES[dims.pp_schedule]
    if cls is Schedule1F1B:
        return cls(pipeline_stages[0], n_microbatches, loss_fn=loss)
    return cls(pipeline_stages, n_microbatches, loss_fn=loss)


@torch.no_grad()
def forward_only(stages: list[tuple[int, PipelineStageModule]], dims: ParallelDims, pp_rank: int, pp_group,
                 input_ids: torch.Tensor | None, hidden: torch.Tensor):
    """One batch forward through the pipeline, stage after stage, without a schedule (validation: the V-shaped
    schedules of torch 2.13 cannot run forward-only). input_ids on the rank holding stage 0; `hidden`: an empty
    tensor of the activations' shape, dtype and device. Returns the last stage's outputs on the rank holding it,
    None elsewhere."""
    n_stages = dims.pp * dims.stages_per_rank
    owner = {s: r for r in range(dims.pp) for s in stage_ids(dims, r)}
    mine = dict(stages)
    acts: tuple = (input_ids,)
    for s in sorted(mine):
        if s > 0 and owner[s - 1] != pp_rank:
            acts = (torch.empty_like(hidden), torch.empty_like(hidden))
            for t in acts:
                dist.recv(t, group_src=owner[s - 1], group=pp_group)
        out = mine[s](*acts)
        if s == n_stages - 1:
            return out
        if owner[s + 1] != pp_rank:
            for t in out:
                dist.send(t.contiguous(), group_dst=owner[s + 1], group=pp_group)
        else:
            acts = out
    return None
