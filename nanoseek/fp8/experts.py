"""The routed experts' grouped GEMMs in FP8 (V3 report §3.3), at the experts' compute seam
(`Experts.forward(x_SD, counts_E)`, nanoseek/model/moe.py): token rows in 1x128 tiles, each expert's weight in
128x128 blocks, the three GEMMs of each grouped projection (forward, input gradient, weight gradient) on FP8
operands with fp32 accumulation. Torch has no FP8 grouped GEMM on CPU (nor a block-scaled one on GPU), so the
products are the exact emulation (dequantize, then one fp32 grouped matmul); the weight gradient tiles the
tokens of each expert on their own, as a kernel whose groups are 128-aligned would. SwiGLU between the two
projections stays in higher precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.moe import Experts
from .block import block_dequantize, block_quantize
from .tile import tile_dequantize, tile_quantize


def _blocks(w_EOI: torch.Tensor, scale_fmt) -> torch.Tensor:
    """Every expert's weight quantized in 128x128 blocks and dequantized (fp32)."""
    return torch.stack([block_dequantize(*block_quantize(w, scale_fmt=scale_fmt)) for w in w_EOI])


def _tiles(x: torch.Tensor, scale_fmt) -> torch.Tensor:
    return tile_dequantize(*tile_quantize(x, scale_fmt=scale_fmt))


class _FP8GroupedLinear(torch.autograd.Function):
    """y_S = x_S W_e(S)^T for rows grouped by expert (offsets_E: each group's end)."""

    @staticmethod
    def forward(ctx, x_SI, w_EOI, offsets_E, scale_fmt):
        w = _blocks(w_EOI, scale_fmt)
        y = torch._grouped_mm(_tiles(x_SI, scale_fmt), w.transpose(1, 2), offs=offsets_E).to(x_SI.dtype)
        # keep x in FP8, tiled along the tokens of each expert (the weight gradient's inner dimension)
        starts = [0] + offsets_E.tolist()[:-1]
        kept = [tile_quantize(x_SI[a:b].t(), scale_fmt=scale_fmt) for a, b in zip(starts, offsets_E.tolist())]
        ctx.save_for_backward(w, offsets_E)
        ctx.kept, ctx.scale_fmt, ctx.dtype, ctx.w_dtype = kept, scale_fmt, x_SI.dtype, w_EOI.dtype
        return y

    @staticmethod
    def backward(ctx, grad_SO):
        w, offsets_E = ctx.saved_tensors
        dx = torch._grouped_mm(_tiles(grad_SO, ctx.scale_fmt), w, offs=offsets_E).to(ctx.dtype)
        starts = [0] + offsets_E.tolist()[:-1]
        dw = torch.stack([_tiles(grad_SO[a:b].t(), ctx.scale_fmt) @ tile_dequantize(*xt).t()
                          for a, b, xt in zip(starts, offsets_E.tolist(), ctx.kept)])
        return dx, dw.to(ctx.w_dtype), None, None


class FP8Experts(Experts):
    """Experts whose two grouped projections run in FP8; same parameters and state dict as Experts."""

    scale_fmt: str | None = None

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offsets = counts_E.cumsum(0).to(torch.int32)
        gate, up = _FP8GroupedLinear.apply(x_SD, self.gate_up_proj, offsets, self.scale_fmt).chunk(2, dim=-1)
        return _FP8GroupedLinear.apply(F.silu(gate) * up, self.down_proj, offsets, self.scale_fmt)
