"""Data parallelism with FSDP2 (`fully_shard`): ZeRO-3-style sharding of parameters, gradients and optimizer
state over the dp_shard ranks, replicated over dp_replicate (HSDP).

`apply_fsdp(model, mesh, expert_mesh, dims)` wraps every block (main layers and MTP modules) and then the
root (embedding, final norm, head), as torchtitan does per transformer block, so one block's parameters are
gathered at a time. Routed experts that expert parallelism already sharded over "ep" are wrapped on their own
over the leftover ranks ("dp_replicate", "efsdp"); their gradients hold the contributions of every ep rank's
tokens (the all-to-all's backward brings them home), so after FSDP's mean over their own group they are ep times
the mean over the global batch: `Parallel.finish_grads` divides them by ep (FSDP's own divide factor would
need a pre-multiplied sum, which gloo lacks).

The losses call `hidden_states` and `mtp_hidden_states` (not `forward`) and the head: those methods are
registered as FSDP forward methods; the root's parameters stay gathered until its backward.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from .expert_parallel import ExpertParallelExperts
from .mesh import ParallelDims


def _dp_mesh(mesh, dims: ParallelDims):
    return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]


def _expert_dp_mesh(expert_mesh, dims: ParallelDims):
    return expert_mesh["dp_replicate", "efsdp"] if dims.dp_replicate > 1 else expert_mesh["efsdp"]


def apply_fsdp(model: nn.Module, mesh, expert_mesh, dims: ParallelDims) -> nn.Module:
    """Shard `model` (a Transformer, or a pipeline stage of one) in place; returns it."""
    dp_mesh = _dp_mesh(mesh, dims)
    mtp = list(getattr(model, "mtp", []))
    for block in [*model.model.layers, *mtp]:
        if not any(True for _ in block.parameters()):  # a pipeline stage's placeholder for another stage's layer
            continue
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, ExpertParallelExperts):
            fully_shard(experts, mesh=_expert_dp_mesh(expert_mesh, dims))
        # an MTP block's output norm (shared_head) is applied after its forward: keep its parameters gathered
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=block not in mtp)
    fully_shard(model, mesh=dp_mesh)
    for method in ("hidden_states",):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model
