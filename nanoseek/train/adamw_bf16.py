"""AdamW with its two moments stored in bf16 over fp32 master weights, as DeepSeek-V3 trains (V3 report §3.3.3,
"Low-Precision Optimizer States"; docs/design/fp8.md): half the optimizer memory, the update itself in fp32.

torch's AdamW cannot do this: its for-loop, foreach and fused kernels all require the moments in the parameter's
dtype. So each step reads a parameter's moments into fp32, applies torch's AdamW update (decoupled weight decay,
bias correction, eps outside the square root), and rounds the moments back to bf16. With moments kept in fp32 the
update is torch.optim.AdamW's (tested).
"""

from __future__ import annotations

import torch


class AdamWBF16Moments(torch.optim.Optimizer):
    """torch.optim.AdamW's update with `exp_avg` and `exp_avg_sq` stored in `moments_dtype` (bf16)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, moments_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments_dtype = moments_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                for key in ("exp_avg", "exp_avg_sq"):  # Optimizer.load_state_dict casts them to p's dtype
                    if state[key].dtype != self.moments_dtype:
                        state[key] = state[key].to(self.moments_dtype)
                state["step"] += 1
                t = state["step"].item()
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                p.mul_(1 - lr * wd)
                denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - beta1 ** t))
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
        return loss
