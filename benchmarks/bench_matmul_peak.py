"""Measured matmul peak of this machine (GFLOP/s), fp32 and bf16: the denominator of the MFU figures.

A large square torch.matmul (default 2048 x 2048 x 2048, 2*n^3 FLOPs) repeated several times; the best
(fastest) repetition is the peak, since we want what the hardware *can* do, not the average under noise.

    python benchmarks/bench_matmul_peak.py                 # fp32 and bf16, n=2048
    python benchmarks/bench_matmul_peak.py --n 4096 --reps 5

Importable: `measure_peak(torch.float32)` -> GFLOP/s.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import load_report, machine_info


def measure_peak(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 10, warmup: int = 2,
                 min_seconds: float = 0.0) -> float:
    """Best GFLOP/s of an (n x n) @ (n x n) matmul in `dtype` over `reps` timed repetitions.

    `min_seconds` keeps repeating (beyond reps) until that much time has been measured.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    best, spent, i = float("inf"), 0.0, 0
    while i < reps or spent < min_seconds:
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        dt = time.perf_counter() - t0
        best, spent, i = min(best, dt), spent + dt, i + 1
    return 2 * n ** 3 / best / 1e9


def measure_peaks(n: int = 2048, reps: int = 10) -> dict[torch.dtype, float]:
    return {dt: measure_peak(dt, n, reps) for dt in (torch.float32, torch.bfloat16)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="matrix side (default 2048)")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per dtype; the best counts")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="keep repeating until this much was timed")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="also report these sides (e.g. 512 1024 4096)")
    args = ap.parse_args()
    print(machine_info())
    print(load_report("start"))
    for n in (args.sizes or [args.n]):
        for dtype in (torch.float32, torch.bfloat16):
            gf = measure_peak(dtype, n, args.reps, min_seconds=args.min_seconds)
            print(f"matmul {n}x{n}x{n} {str(dtype).replace('torch.', ''):>8}: {gf:8.1f} GFLOP/s "
                  f"(best of >= {args.reps} reps and >= {args.min_seconds:g} s)")


if __name__ == "__main__":
    main()
