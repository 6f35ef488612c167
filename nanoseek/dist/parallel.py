"""What a training run does differently on more than one process: the process group and meshes, the transforms
of the built model, which rows of the global batch this rank takes, and the reductions of gradients and
metrics.

`Parallel.prepare(model)` applies, in torchtitan's order: the pipeline split (a pruned copy of the model per
local stage), expert parallelism (each MoE's routed experts sharded over "ep"), FSDP2 (per block, then the
root) when there is a data-parallel degree. A run that is only data-parallel and must keep whole weights on
every rank (SFT and GRPO, whose rollout engine reads the weights token by token) uses `replicate=True`: no
FSDP, gradients averaged by one all-reduce before the optimizer step.

The global batch does not depend on the mesh: every data-parallel rank draws the same rows and keeps its
slice (`rows`), and the losses are means over them, so averaging gradients and metrics over the data-parallel
ranks gives the single-process values.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..config import ConfigError
from .expert_parallel import ExpertParallelExperts, apply_ep
from .fsdp import apply_fsdp
from .grad import clip_grad_norm_
from .mesh import ParallelDims, build_meshes
from .pipeline import build_schedule, build_stages, default_microbatches


def init_distributed(device: torch.device) -> int:
    """Join torchrun's process group when there is one (gloo on CPU, NCCL on GPUs); returns the world size."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return dist.get_world_size() if dist.is_initialized() else 1


class Parallel:
    """The parallel layout of one run on this rank.

    Args:
        dims: the degrees (validated against the world size).
        device: this rank's device.
        replicate: keep whole weights on every rank (plain data parallelism, see the module docstring).
    """

    def __init__(self, dims: ParallelDims, device: torch.device, replicate: bool = False):
        self.dims, self.device, self.replicate = dims, device, replicate
        # DTensor warns at every full_tensor() of a gradient norm sharded over two mesh dimensions (the experts'):
        # two small all-reduces instead of one, per step, which is no problem worth a line in the log
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        if replicate and (dims.pp > 1 or dims.ep > 1):
            raise ConfigError("--pp and --ep shard the model; this command keeps whole weights on every rank "
                              "(data parallelism only)")
        self.mesh, self.expert_mesh = build_meshes(dims, device.type)
        dp_mesh = self.mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self.dp_group, self.dp_rank = dp_mesh.get_group(), dp_mesh.get_local_rank()
        self.pp_group = self.mesh["pp"].get_group() if dims.pp > 1 else None
        self.pp_rank = self.mesh["pp"].get_local_rank()
        self.pipeline = self.stages = None
        self.expert_params: list[nn.Parameter] = []

    # ---- the model --------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> list[nn.Module]:
        """Transform the built `model` for this rank; returns the modules whose parameters it trains (the model
        itself, or its local pipeline stages)."""
        dims = self.dims
        if dims.pp > 1:
            self.stages = build_stages(model, dims, self.pp_rank)
            modules = [stage for _, stage in self.stages]
        else:
            modules = [model]
        for module in modules:
            if dims.ep > 1:
                apply_ep(module, self.expert_mesh["ep"])
            if not self.replicate and dims.dp > 1:
                apply_fsdp(module, self.mesh, self.expert_mesh, dims)
        self.expert_params = [p for module in modules for m in module.modules() if isinstance(m, ExpertParallelExperts)
                              for p in m.parameters()]
        return modules

    @property
    def sharded(self) -> bool:
        """Whether parameters are split over ranks (checkpoints then go through torch.distributed.checkpoint)."""
        return not self.replicate and (self.dims.dp > 1 or self.dims.ep > 1 or self.dims.pp > 1)

    def build_pipeline(self, n_microbatches: int | None, rows: int, seq_len: int, loss_fn) -> None:
        """The pipeline schedule over this rank's stages for `rows` local rows of `seq_len` tokens per step, cut
        into n_microbatches (None: the fewest the schedule accepts); loss_fn(outputs, labels) runs on the last
        stage."""
        n = n_microbatches or default_microbatches(self.dims)
        if rows % n:
            raise ConfigError(f"--microbatches {n} must divide the {rows} rows each data-parallel rank takes per "
                              "micro-batch (batch_size / data-parallel ranks)")
        self.n_microbatches = n
        self.pipeline = build_schedule(self.stages, self.dims, n, rows // n, seq_len, loss_fn, self.device,
                                       self.pp_group)

    def pipeline_step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """Forward and backward of this rank's rows through the pipeline; the micro-batch losses on the rank that
        holds the last stage ([] elsewhere)."""
        holds = {s for s, _ in self.stages}
        n_stages = self.dims.pp * self.dims.stages_per_rank
        args = (input_ids,) if 0 in holds else ()
        losses: list[torch.Tensor] = []
        if n_stages - 1 in holds:
            self.pipeline.step(*args, target=labels, losses=losses)
        else:
            self.pipeline.step(*args)
        return losses

    # ---- data ---------------------------------------------------------------------------------------
    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This data-parallel rank's slice of a global batch's rows."""
        n = t.shape[0] // self.dims.dp
        return t[self.dp_rank * n:(self.dp_rank + 1) * n]

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.dims.dp:
            raise ConfigError(f"batch_size {batch_size} must be a multiple of the data-parallel ranks "
                              f"(--dp-replicate x --dp-shard = {self.dims.dp}): every step splits the same global "
                              "batch over them")

    # ---- reductions ---------------------------------------------------------------------------------------
    def mean_over_dp(self, values: dict[str, float]) -> dict[str, float]:
        """Metrics averaged over the data-parallel ranks (and gathered from the pipeline stages that hold them:
        a value missing on a rank counts as 0 there, so every rank must name the same keys)."""
        if not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.dims.dp).tolist()))

    def merge_over_pp(self, values: dict) -> dict:
        """Per-layer values (disjoint keys) of every pipeline rank, merged in layer order."""
        parts: list[dict] = [{}] * self.dims.pp
        dist.all_gather_object(parts, values, group=self.pp_group)
        merged = {k: v for part in parts for k, v in part.items()}
        return dict(sorted(merged.items(), key=lambda kv: _layer_order(kv[0])))

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients over the data-parallel ranks (replicate mode): one flat all-reduce per dtype. A
        parameter that has a gradient on some rank gets one everywhere (zeros where it had none); one that has
        none anywhere keeps None, as in a single process (AdamW then leaves it alone)."""
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        dist.all_reduce(has, group=self.dp_group)
        for p, anywhere in zip(params, has.tolist()):
            if anywhere and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        for dtype in sorted({g.dtype for g in grads}, key=str):
            same = [g for g in grads if g.dtype == dtype]
            flat = _flatten_dense_tensors(same)
            dist.all_reduce(flat, group=self.dp_group)
            flat /= self.dims.dp
            for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
                g.copy_(reduced)

    def finish_grads(self, params: list[nn.Parameter]) -> None:
        """Complete the data-parallel reduction the transforms leave: the replicate mode's all-reduce, and the
        routed experts' gradients divided by ep (nanoseek/dist/fsdp.py)."""
        if self.replicate:
            self.all_reduce_grads(params)
        for p in self.expert_params:
            if p.grad is not None:
                p.grad.div_(self.dims.ep)

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> float:
        return clip_grad_norm_(params, max_norm, self.pp_group).item()


def _layer_order(name: str) -> tuple[int, int]:
    """Main layers ("model.layers.3.mlp") in order, then the MTP blocks ("mtp.0.mlp")."""
    parts = name.split(".")
    return (1, int(parts[1])) if parts[0] == "mtp" else (0, int(parts[2]))
