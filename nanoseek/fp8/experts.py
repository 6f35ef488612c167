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
from .block import block_dequantize_stacked, block_quantize
from .tile import tile_dequantize, tile_quantize


def _blocks(w_EOI: torch.Tensor, scale_fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's weight in 128x128 blocks: FP8 (E, O, I) and scales (E, ceil(O/128), ceil(I/128))."""
    q, s = zip(*(block_quantize(w, scale_fmt=scale_fmt) for w in w_EOI))
    with torch.autocast(w_EOI.device.type, enabled=False):  # autocast's stack has no FP8 rule
        return torch.stack(q), torch.stack(s)


def _tiles(x: torch.Tensor, scale_fmt) -> torch.Tensor:
    return tile_dequantize(*tile_quantize(x, scale_fmt=scale_fmt))


class _FP8GroupedLinear(torch.autograd.Function):
    """y_S = x_S W_e(S)^T for rows grouped by expert (offsets_E: each group's end). What the backward keeps is FP8:
    the weights' blocks and x tiled along the tokens of each expert (the weight gradient's inner dimension)."""

    @staticmethod
    def forward(ctx, x_SI, w_EOI, offsets_E, scale_fmt):
        w_q, w_s = _blocks(w_EOI, scale_fmt)
        w = block_dequantize_stacked(w_q, w_s)
        y = torch._grouped_mm(_tiles(x_SI, scale_fmt), w.transpose(1, 2), offs=offsets_E)
        ends = offsets_E.tolist()
        kept = [t for a, b in zip([0] + ends[:-1], ends) for t in tile_quantize(x_SI[a:b].t(), scale_fmt=scale_fmt)]
        ctx.save_for_backward(w_q, w_s, offsets_E, *kept)
        ctx.scale_fmt, ctx.dtype, ctx.w_dtype = scale_fmt, x_SI.dtype, w_EOI.dtype
        return y.to(x_SI.dtype)

    @staticmethod
    def backward(ctx, grad_SO):
        w_q, w_s, offsets_E, *kept = ctx.saved_tensors
        w = block_dequantize_stacked(w_q, w_s)
        dx = torch._grouped_mm(_tiles(grad_SO, ctx.scale_fmt), w, offs=offsets_E).to(ctx.dtype)
        ends = offsets_E.tolist()
        dw = torch.stack([_tiles(grad_SO[a:b].t(), ctx.scale_fmt) @ tile_dequantize(xt_q, xt_s).t()
                          for a, b, xt_q, xt_s in zip([0] + ends[:-1], ends, kept[0::2], kept[1::2])])
        return dx, dw.to(ctx.w_dtype), None, None


class FP8Experts(Experts):
    """Experts whose two grouped projections run in FP8; same parameters and state dict as Experts."""

    scale_fmt: str | None = None

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offsets = counts_E.cumsum(0).to(torch.int32)
        gate, up = _FP8GroupedLinear.apply(x_SD, self.gate_up_proj, offsets, self.scale_fmt).chunk(2, dim=-1)
        return _FP8GroupedLinear.apply(F.silu(gate) * up, self.down_proj, offsets, self.scale_fmt)
