"""Padded sizes that keep a CPU bf16 run's GEMM shapes few.

On CPU, torch runs bf16 (and fp16) GEMMs through oneDNN, which builds a kernel for every new shape: about 2 ms
each, ten times the GEMM itself at the small preset's sizes (a 700 x 256 x 256 matmul; benchmarks/README.md,
"Figures cited from code"). fp32 GEMMs (MKL) have no such cost. Shapes that follow the data therefore make bf16
slow: the routed experts' row counts change at every step, and so do SFT's and GRPO's padded lengths. Padding
each size up to a bucket bounds the shapes a run sees to a few dozen, whose kernels are built once and reused;
the bucket grows with the size, so padding adds at most 12.5% (or 16) rows.
"""

from __future__ import annotations

import torch


def bucketing_pays(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether GEMMs in `dtype` on `device` build a kernel per shape (bf16/fp16 on CPU)."""
    return torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def bucketed(n: int) -> int:
    """n rounded up to a multiple of 2^(floor(log2 n) - 3), at least 16 (0 stays 0): about eight sizes per
    doubling."""
    if n <= 0:
        return 0
    step = max(16, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def bucketed_counts(counts: torch.Tensor) -> torch.Tensor:
    """`bucketed` of every element of an integer tensor."""
    step = torch.exp2(torch.log2(counts.clamp(min=1).double()).floor() - 3).clamp(min=16)
    return (torch.ceil(counts / step) * step).to(counts.dtype)


def length_bucket_limit(precision: str, device: torch.device | str, limit: int) -> int:
    """`limit` when a run in `precision` on `device` should pad its lengths to buckets (bf16 autocast, alone or
    around FP8's GEMMs, on CPU), else 0: no bucketing. The `bucket_limit` of collate_examples and pad_batch."""
    return limit if precision in ("bf16", "fp8") and bucketing_pays(torch.bfloat16, device) else 0
