"""Global gradient-norm clipping over parameters spread across meshes and pipeline stages.

torch's clip_grad_norm_ handles DTensors of one mesh. Here the dense parameters live on the data-parallel mesh,
the routed experts on the expert mesh, and every pipeline rank holds other layers: the norm is taken per mesh,
the squares summed, summed again over the pipeline group, and every gradient scaled by the same coefficient.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip the gradients of `parameters` to a global norm of max_norm (inf: only measure); returns the norm
    before clipping (a float32 scalar tensor on the gradients' device)."""
    by_mesh: dict = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            by_mesh[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    squares = []
    for params in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares.append(norm.float() ** 2)
    device = squares[0].device if squares else torch.device("cpu")
    total_sq = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if math.isfinite(max_norm):
        for params in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
