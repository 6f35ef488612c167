"""RMSNorm, computed in fp32 and cast back before the weight, as HF and V3.2 do (docs/design/mla.md)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # Same math in one call (no casts, weight applied inside): decode runs ~17 norms per token, and
            # each saved op counts there. Not with autograd: its backward is slower at training shapes.
            return torch.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = torch.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed
