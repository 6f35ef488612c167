"""The FP8 linear layer of DeepSeek-V3's training recipe (V3 report §3.3; docs/design/fp8.md): its three GEMMs
in FP8 with fp32 accumulation (nanoseek/fp8/gemm.py).

- Fprop: y = x W^T with x in 1x128 tiles, W in 128x128 blocks.
- Dgrad: dx = dy W with dy in 1x128 tiles along the output channels and the same W blocks (transposed).
- Wgrad: dW = dy^T x with both in tiles along the tokens (the transposed tiling of the forward's).
The activation kept for the backward is x in FP8 with its token-axis tiles (and W's FP8 blocks), not x in full
precision: the memory the recipe saves. E4M3 everywhere; online max-abs scales. The master weight stays in its
own dtype (fp32); the layer's output and input gradient come back in the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .block import block_quantize
from .gemm import fp8_mm
from .tile import tile_quantize


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale_fmt: str | None):
        shape = x.shape
        x_MK = x.reshape(-1, shape[-1])
        x_q, x_s = tile_quantize(x_MK, scale_fmt=scale_fmt)
        w_q, w_s = block_quantize(weight, scale_fmt=scale_fmt)
        y = fp8_mm(x_q, x_s, w_q, w_s, b_blocks=True, out_dtype=x.dtype)
        xt_q, xt_s = tile_quantize(x_MK.t(), scale_fmt=scale_fmt)     # (K, M), tiles along the tokens
        ctx.save_for_backward(xt_q, xt_s, w_q, w_s)
        ctx.shape, ctx.scale_fmt, ctx.dtype, ctx.w_dtype = shape, scale_fmt, x.dtype, weight.dtype
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xt_q, xt_s, w_q, w_s = ctx.saved_tensors
        g_MN = grad.reshape(-1, grad.shape[-1])
        g_q, g_s = tile_quantize(g_MN, scale_fmt=ctx.scale_fmt)
        dx = fp8_mm(g_q, g_s, w_q.t().contiguous(), w_s.t().contiguous(), b_blocks=True, out_dtype=ctx.dtype)
        gt_q, gt_s = tile_quantize(g_MN.t(), scale_fmt=ctx.scale_fmt)  # (N, M), tiles along the tokens
        dw = fp8_mm(gt_q, gt_s, xt_q, xt_s, b_blocks=False, out_dtype=torch.float32)
        return dx.reshape(ctx.shape), dw.to(ctx.w_dtype), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """x W^T through FP8 GEMMs (forward and backward), no bias."""
    return _FP8Linear.apply(x, weight, scale_fmt)


class FP8Linear(nn.Linear):
    """nn.Linear (no bias) whose three GEMMs run in FP8; same parameter, same state dict, so checkpoints and
    every other tool see an ordinary linear layer."""

    scale_fmt: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scale_fmt)
