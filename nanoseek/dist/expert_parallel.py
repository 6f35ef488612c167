"""Expert parallelism: each of the `ep` ranks of a group holds E/ep routed experts; tokens travel to their
experts and back with `all_to_all_single` (the autograd-aware functional collective).

`apply_ep(model, ep_mesh)` replaces every MoE layer's `Experts` by an `ExpertParallelExperts` at the model's
compute seam (`Experts.forward(x_SD, counts_E)`: token rows already sorted by global expert): dispatch and
combine stay local and unchanged, and
  1. the per-expert counts are exchanged (one small all-to-all), giving each rank how many rows it sends to
     and receives from every other rank;
  2. the rows travel (all-to-all), arriving grouped by source rank, then by local expert;
  3. they are regrouped by local expert, run through the grouped GEMMs on the local weights, and put back;
  4. the outputs travel home (the reverse all-to-all) in the order the rows left.
The weights stay DTensors sharded on dim 0 over the ep mesh, so the global layout is known to FSDP2 (which
shards them further over the leftover data-parallel ranks) and to torch.distributed.checkpoint.

Group-limited routing maps onto ranks when each rank holds whole expert groups (n_group a multiple of ep): a
token then reaches at most topk_group ranks, V3's node-limited routing with ranks for nodes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..config import ConfigError
from ..model.moe import Experts, grouped_swiglu


class ExpertParallelExperts(nn.Module):
    """The routed experts of one MoE layer, sharded over an ep group (see the module docstring)."""

    def __init__(self, experts: Experts, ep_mesh):
        super().__init__()
        self.ep_mesh, self.group = ep_mesh, ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.n_experts = experts.gate_up_proj.shape[0]
        self.gate_up_proj = nn.Parameter(distribute_tensor(experts.gate_up_proj.data, ep_mesh, [Shard(0)]))
        self.down_proj = nn.Parameter(distribute_tensor(experts.down_proj.data, ep_mesh, [Shard(0)]))

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        ep, local = self.ep, self.n_experts // self.ep
        w13, w2 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.gate_up_proj, self.down_proj))
        with torch.no_grad():
            recv_RL = torch.empty_like(counts_E)                       # rows from rank r for local expert l
            dist.all_to_all_single(recv_RL, counts_E, group=self.group)
            recv_RL = recv_RL.view(ep, local)
            send = counts_E.view(ep, local).sum(1).tolist()
            received = recv_RL.sum(1).tolist()
            # arrived grouped by (source rank, local expert): a stable sort by local expert groups them for the GEMM
            expert_of_row = torch.arange(local, device=x_SD.device).repeat(ep).repeat_interleave(recv_RL.flatten())
            order = expert_of_row.argsort(stable=True)
            inverse = order.argsort()
        x_recv = all_to_all_single_autograd(x_SD, received, send, self.group)
        y_sorted = grouped_swiglu(x_recv.index_select(0, order), recv_RL.sum(0).cumsum(0).to(torch.int32), w13, w2)
        return all_to_all_single_autograd(y_sorted.index_select(0, inverse), send, received, self.group)


def apply_ep(model: nn.Module, ep_mesh) -> nn.Module:
    """Shard every MoE layer's routed experts over `ep_mesh` (a 1-D DeviceMesh); returns the model."""
    ep = ep_mesh.size()
    for name, moe in model.moe_layers():
        cfg = moe.gate.cfg
        if cfg.n_routed_experts % ep:
            raise ConfigError(f"--ep {ep} must divide n_routed_experts ({cfg.n_routed_experts})")
        if cfg.n_group > 1 and cfg.n_group % ep:
            raise ConfigError(f"--ep {ep} must divide n_group ({cfg.n_group}) so each rank holds whole expert "
                              "groups and group-limited routing limits the ranks a token reaches")
        moe.experts = ExpertParallelExperts(moe.experts, ep_mesh)
    return model


def routed_ranks(idx_NK: torch.Tensor, n_experts: int, ep: int) -> torch.Tensor:
    """How many ep ranks each token's chosen experts live on (N,)."""
    rank_NK = idx_NK // (n_experts // ep)
    return torch.zeros(idx_NK.shape[0], ep, dtype=torch.bool, device=idx_NK.device).scatter_(1, rank_NK, True).sum(1)
