"""Fine-grained FP8 (E4M3) scaling of DeepSeek-V3's training recipe (V3 report §3.3; docs/design/fp8.md):
activations and gradients in 1x128 tiles along the last dimension, weights in 128x128 blocks (block.py), one
fp32 scale per tile or block from its max-abs value, computed online (no history).

x ~= float(x_fp8) * scale_inv, tile by tile. `scale_fmt="ue8m0"` rounds every scale up to a power of two, the
format of the V3.1/V3.2 checkpoints (an 8-bit exponent with no mantissa); rounding up keeps every value within
E4M3's range. Edge tiles shorter than 128 are scaled on their own values.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_FMTS = (None, "ue8m0")


def round_scale(scale: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """The scale as stored: as is, or rounded up to a power of two (ue8m0)."""
    if scale_fmt is None:
        return scale
    if scale_fmt != "ue8m0":
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    return torch.exp2(torch.ceil(torch.log2(scale)))


def tile_quantize(x: torch.Tensor, tile: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8 of x's shape, scale_inv (..., ceil(K/tile)) fp32) with x ~= x_fp8 * scale_inv per 1 x tile tile of
    the last dimension K; scale_inv = amax / 448 (rounded per scale_fmt)."""
    K = x.shape[-1]
    pad = -K % tile
    xf = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (-1, tile))
    scale_inv = round_scale(xf.abs().amax(-1).clamp(min=1e-12) / FP8_MAX, scale_fmt)
    q = (xf / scale_inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2)[..., :K].contiguous(), scale_inv


def tile_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, tile: int = 128,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of tile_quantize."""
    K = q.shape[-1]
    if scale_inv.shape[-1] != -(-K // tile) or scale_inv.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match {tuple(q.shape)} with 1x{tile} "
                         "tiles")
    return (q.float() * scale_inv.repeat_interleave(tile, -1)[..., :K]).to(dtype)
