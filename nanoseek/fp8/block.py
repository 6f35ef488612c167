"""128x128 block-scaled FP8 (E4M3) weights, the format of the released DeepSeek-V3/R1 checkpoints
(docs/design/checkpoints.md): W[r, c] = float(W_fp8[r, c]) * scale_inv[r // 128, c // 128].

Edge blocks that are not 128-aligned are zero-padded to compute their scale; the padding is dropped.
"""

from __future__ import annotations

import torch

from .tile import FP8_MAX, round_scale


def _padded_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    pr, pc = -rows % block, -cols % block
    w = torch.nn.functional.pad(w, (0, pc, 0, pr))
    return w.view((rows + pr) // block, block, (cols + pc) // block, block)


def block_quantize(w: torch.Tensor, block: int = 128,
                   scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weight (same shape) and fp32 scale_inv (ceil(rows/128), ceil(cols/128)); scale = amax/448, rounded
    up to a power of two with scale_fmt="ue8m0" (tile.round_scale)."""
    if w.dim() != 2:
        raise ValueError(f"block_quantize expects a 2-D weight, got shape {tuple(w.shape)}")
    blocks = _padded_blocks(w.float(), block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = round_scale(amax / FP8_MAX, scale_fmt)
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(blocks.shape[0] * block, blocks.shape[2] * block)[: w.shape[0], : w.shape[1]]
    return q.contiguous(), scale_inv


def block_dequantize_stacked(q_EOI: torch.Tensor, s_EOI: torch.Tensor, parts: int = 1,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stacked expert weights (E, O, I) from FP8 and their scale grids; `parts` row ranges of each (a fused gate
    and up projection) were quantized apart, their grids stacked one after the other."""
    out = []
    for q, s in zip(q_EOI, s_EOI):
        out.append(torch.cat([block_dequantize(qp, sp, dtype=dtype)
                              for qp, sp in zip(q.chunk(parts, dim=0), s.chunk(parts, dim=0))]))
    return torch.stack(out) if out else q_EOI.new_empty(q_EOI.shape, dtype=dtype)


def block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of block_quantize; checks that the scale grid matches the weight."""
    rows, cols = q.shape
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
                         f"with {block}x{block} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (q.float() * scale).to(dtype)
