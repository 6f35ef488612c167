"""What this machine computes fastest, measured rather than assumed: `--precision auto`.

CPUs differ by more than a factor of ten in how their bf16 GEMMs compare with fp32 ones: on a Xeon with
AVX512-BF16 but no AMX, bf16 ran at half the fp32 rate; with AMX, or on an EPYC with AVX512-BF16, several times
faster (benchmarks/README.md, "Figures cited from code"). CPU flags do not tell these apart, so `auto` times the
two kinds of work a training step is made of, in both dtypes, at shapes of the `small` preset: a dense matmul
(attention projections, the head) and the routed experts' forward and backward (grouped matmuls whose shapes
follow the routing). bf16 autocast is chosen when a training step's matmuls, weighted by their FLOPs, come out
BF16_MARGIN faster in bf16 (the experts follow the autocast dtype); on CUDA bf16 always is. The probe takes about
a second; its result is cached per machine (CPU model, threads, torch version, probe version) in
`$XDG_CACHE_HOME/nanoseek/machine.json` (default ~/.cache), so every run on one machine makes the same choice.
`nanoseek info --machine` prints it; `--remeasure` measures again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

from .model.moe import grouped_swiglu

BF16_MARGIN = 1.2        # bf16 must be this much faster: a near tie is not worth bf16's rounding
# the routed experts' share of a training step's matmul FLOPs in the small preset (1.18M of its 4.68M active matmul
# parameters; benchmarks/README.md, "MFU"); the dense GEMMs do the rest
EXPERT_SHARE = 0.25
PRECISIONS = ("auto", "float32", "bf16", "fp8")
PROBE_VERSION = 2        # part of the cache key: a changed probe measures again
# the training commands' default (a --config file or --precision overrides it); the config classes keep float32,
# so that the API gives the same numbers on every machine
COMMAND_DEFAULTS = {"precision": "auto"}


@dataclass(frozen=True)
class MachineProfile:
    """Attributes:
        cpu: the CPU model (/proc/cpuinfo), threads: torch's CPU threads, torch: its version.
        dense_fp32, dense_bf16: GFLOP/s of a (2048 x 256) @ (256 x 768) matmul.
        grouped_fp32, grouped_bf16: GFLOP/s of the routed experts' forward and backward (see `probe`).
    """

    cpu: str
    threads: int
    torch: str
    dense_fp32: float
    dense_bf16: float
    grouped_fp32: float
    grouped_bf16: float

    @property
    def bf16_speedup(self) -> float:
        """fp32 over bf16 time of a training step's matmuls: the dense and the experts' FLOPs (EXPERT_SHARE) at
        the measured rates. Elementwise work is not in it; on the AMX Xeon of benchmarks/README.md a predicted
        1.9x came out as 1.3x for the whole pretraining step."""
        def seconds(dense: float, experts: float) -> float:
            return (1 - EXPERT_SHARE) / dense + EXPERT_SHARE / experts
        return seconds(self.dense_fp32, self.grouped_fp32) / seconds(self.dense_bf16, self.grouped_bf16)

    @property
    def bf16_pays(self) -> bool:
        return self.bf16_speedup >= BF16_MARGIN

    @property
    def precision(self) -> str:
        """What `--precision auto` picks on this CPU."""
        return "bf16" if self.bf16_pays else "float32"

    def describe(self) -> str:
        return (f"{self.cpu}; {self.threads} threads; torch {self.torch}\n"
                f"dense GEMM fp32 {self.dense_fp32:7.1f}  bf16 {self.dense_bf16:7.1f} GFLOP/s "
                f"(bf16 {self.dense_bf16 / self.dense_fp32:.2f}x)\n"
                f"experts    fp32 {self.grouped_fp32:7.1f}  bf16 {self.grouped_bf16:7.1f} GFLOP/s "
                f"(bf16 {self.grouped_bf16 / self.grouped_fp32:.2f}x)\n"
                f"a training step's matmuls: bf16 {self.bf16_speedup:.2f}x as fast ({EXPERT_SHARE:.0%} of their "
                f"FLOPs in the experts)\n"
                f"--precision auto: {self.precision} (bf16 when that is >= {BF16_MARGIN}x)")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best_seconds(fns: dict, seconds: float) -> dict:
    """Best time of each function, calling them in turn for about `seconds` in all: interleaved, so that load
    from other processes hits every dtype alike, and the best, not the mean: what the hardware can do."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def probe(seconds: float = 1.0) -> MachineProfile:
    """Measure the four GEMM rates on this CPU (about `seconds` in all) at the small preset's shapes: 2048 tokens of
    width 256; a 256 -> 768 projection; the routed experts' forward and backward (16 experts, SwiGLU 256 -> 2 x 128
    -> 256) through the model's own code, with per-expert row counts that change at every call, as routing makes
    them (on CPU, bf16 GEMMs pay a kernel build per new shape: nanoseek/model/buckets.py)."""
    g = torch.Generator().manual_seed(0)
    tokens, dim, inter, experts, moe_inter = 2048, 256, 768, 16, 128
    x, w = torch.randn(tokens, dim, generator=g), torch.randn(inter, dim, generator=g)
    w13 = torch.randn(experts, 2 * moe_inter, dim, generator=g).requires_grad_()
    w2 = torch.randn(experts, dim, moe_inter, generator=g).requires_grad_()
    grad = torch.randn(tokens, dim, generator=g)
    routing = torch.Generator().manual_seed(1)

    def experts_step(xd):
        counts = torch.multinomial(torch.ones(experts), tokens, replacement=True, generator=routing).bincount(
            minlength=experts)
        grouped_swiglu(xd, counts.cumsum(0).to(torch.int32), w13, w2).backward(grad.to(xd.dtype))

    fns, flops = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xd, wd = x.to(dtype), w.to(dtype)
        fns[f"dense_{name}"] = lambda xd=xd, wd=wd: xd @ wd.t()
        fns[f"grouped_{name}"] = lambda xg=xd.clone().requires_grad_(): experts_step(xg)
        flops[f"dense_{name}"] = 2 * tokens * dim * inter
        flops[f"grouped_{name}"] = 3 * 2 * tokens * 3 * dim * moe_inter   # forward + backward of three projections
    best = _best_seconds(fns, seconds)
    rates = {name: flops[name] / best[name] / 1e9 for name in fns}
    return MachineProfile(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__, **rates)


def _cache_file() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "nanoseek", "machine.json")


def cache_key(cpu: str, threads: int, torch_version: str) -> str:
    """The cache entry of a machine: a changed CPU, thread count, torch or probe measures again."""
    return f"{cpu} | {threads} threads | torch {torch_version} | probe {PROBE_VERSION}"


def machine_profile(remeasure: bool = False) -> MachineProfile:
    """This machine's profile: from the cache when it holds one for this CPU, thread count and torch, else
    measured and cached. A probe taken while other processes kept the cores busy (load average above the core
    count) is used once but not cached: other jobs can swing one dtype's rate several-fold between calls. An
    unwritable cache only costs the next run another probe."""
    key = cache_key(cpu_model(), torch.get_num_threads(), torch.__version__)
    path = _cache_file()
    try:
        with open(path) as f:
            cache = json.load(f)
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if not remeasure and isinstance(cache.get(key), dict):
        try:
            return MachineProfile(**cache[key])
        except TypeError:   # written by another version: measure again
            pass
    profile = probe()
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        warnings.warn(f"precision probe taken on a busy machine (load average {load:.1f} on {cores} cores): not "
                      "cached; `nanoseek info --machine --remeasure` on an idle machine stores one", stacklevel=2)
        return profile
    cache[key] = dataclasses.asdict(profile)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass
    return profile


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`precision` with "auto" replaced by this device's choice: bf16 on CUDA, the probe's on CPU, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16"
    return machine_profile().precision if device.type == "cpu" else "float32"
