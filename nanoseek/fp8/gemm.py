"""FP8 GEMMs with DeepSeek's fine-grained scales: A @ B^T for A (M, K) in 1x128 tiles along K and B (N, K) in
128x128 blocks or in 1x128 tiles along K, accumulated in fp32.

Backends, chosen per device:
- CUDA with block-scaled `torch._scaled_mm` (Hopper, cuBLASLt >= 12.9): the real FP8 GEMM, whose accumulation is
  promoted to fp32 every 128 elements of K as the V3 report describes. It is checked once per device against the
  emulation on a small product and not used if it disagrees or raises.
- Elsewhere (CPU, other GPUs): an exact emulation: every tile or block dequantized (x_fp8 * scale) and multiplied
  in fp32, which is the same sum of per-128-element partial products, in fp32.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .block import block_dequantize
from .tile import tile_dequantize


def _emulated(a_q, a_s, b_q, b_s, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    a = tile_dequantize(a_q, a_s)
    b = block_dequantize(b_q, b_s) if b_blocks else tile_dequantize(b_q, b_s)
    return (a @ b.t()).to(out_dtype)


def _scaled_mm(a_q, a_s, b_q, b_s, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm with block scales: scale_a (M, K/128) outer-dim-major; scale_b (K/128, N/128) for blocks,
    (K/128, N) for tiles, both outer-dim-major; mat_b column-major (K, N)."""
    scale_a = a_s.t().contiguous().t()
    scale_b = b_s.t().contiguous()
    return torch._scaled_mm(a_q, b_q.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


@functools.cache
def scaled_mm_ok(device: torch.device) -> bool:
    """Whether this device's block-scaled _scaled_mm matches the emulation (checked once, on a small product)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    from .block import block_quantize
    from .tile import tile_quantize
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(256, 384, generator=g).to(device) for _ in range(2))
    aq, as_ = tile_quantize(a)
    try:
        for b_blocks in (True, False):
            bq, bs = block_quantize(b) if b_blocks else tile_quantize(b)
            want = _emulated(aq, as_, bq, bs, b_blocks, torch.float32)
            got = _scaled_mm(aq, as_, bq, bs, b_blocks, torch.float32)
            if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item()):
                raise RuntimeError(f"max difference {(got - want).abs().max().item():.3g}")
    except (RuntimeError, NotImplementedError) as e:
        warnings.warn(f"block-scaled FP8 GEMMs unavailable on {device} ({e}); using the exact emulation",
                      stacklevel=3)
        return False
    return True


def fp8_mm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_blocks: bool = True,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A @ B^T (M, N): a_q (M, K) fp8 with a_s (M, ceil(K/128)); b_q (N, K) fp8 with b_s (ceil(N/128), ceil(K/128))
    when b_blocks, else (N, ceil(K/128))."""
    if a_q.is_cuda and scaled_mm_ok(a_q.device):
        return _scaled_mm(a_q, a_s, b_q, b_s, b_blocks, out_dtype)
    return _emulated(a_q, a_s, b_q, b_s, b_blocks, out_dtype)
