"""What this machine computes fastest, measured rather than assumed: `--precision auto`.

CPUs differ by more than a factor of ten in how their bf16 GEMMs compare with fp32 ones: on a Xeon with
AVX512-BF16 but no AMX, bf16 ran at half the fp32 rate; with AMX, or on an EPYC with AVX512-BF16, several times
faster (benchmarks/README.md, "Figures cited from code"). CPU flags do not tell these apart, so `auto` times the
two kinds of work a training step is made of, in both dtypes, at shapes of the `small` preset: a dense matmul
(attention projections, the head) and the routed experts' forward and backward (grouped matmuls whose shapes
follow the routing). bf16 autocast is chosen when a training step's matmuls, weighted by their FLOPs, come out
BF16_MARGIN faster in bf16 (the experts follow the autocast dtype); on CUDA bf16 always is. It also times the
attention core (torch's fused kernel) forward and backward in both dtypes: where fp32 is faster, bf16 training runs
that core in fp32 (`attention_core_dtype`; its bf16 backward can be slower than fp32 even where bf16 GEMMs are
several times faster). The probe takes about a second; its result is cached per machine (CPU model, threads,
torch version, probe version) in
`$XDG_CACHE_HOME/nanoseek/machine.json` (default ~/.cache), so every run on one machine makes the same choice.
`nanoseek info --machine` prints it; `--remeasure` measures again.

Compiled rollouts (`--compile auto` of `nanoseek grpo` and `r1`) are decided the same way: a second probe,
`decode_profile`, times decode steps of the `small` preset eager and through torch.compile, and how long the
compile takes. Compiling made GRPO's rollouts 20-25% faster on one CPU and no faster on another (after an 83 s
compile; benchmarks/README.md), so only a measurement can tell. It takes about a minute (mostly compiling), is
cached like the first, and is only taken for a run long enough that compiling could pay (MIN_DECODE_STEPS).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
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
PROBE_VERSION = 3        # part of the cache key: a changed probe measures again
# the attention core under bf16 autocast runs in fp32 when its fp32 forward + backward is this much faster: torch's
# fused CPU kernel has a bf16 backward 1.5-4x slower than its fp32 one (forward + backward 1.2-3.2x) on an AMX Xeon
# whose bf16 GEMMs are 3-8x faster (benchmarks/README.md, "Machine B"); the casts around an fp32 core cost a little
ATTENTION_MARGIN = 1.1
# rows, heads, tokens, head width (queries and keys; values are padded to it): an SFT micro-batch of the small preset
ATTENTION_SHAPE = (8, 4, 256, 48)
COMPILE_MARGIN = 1.2     # compiled decode steps must be this much faster for compiled rollouts
# fewer decode steps than this cannot pay for a compile: at a 2x speedup of a 20 ms step they save 20 s, less than
# every compile measured at decode batches of 16-32 rows (42-90 s; benchmarks/README.md), so no probe for them
MIN_DECODE_STEPS = 2000
DECODE_ROWS, DECODE_CONTEXT, DECODE_STEPS = 32, 96, 16   # the decode probe: rows, prompt tokens, timed steps
# the training commands' default (a --config file or --precision overrides it); the config classes keep float32,
# so that the API gives the same numbers on every machine
COMMAND_DEFAULTS = {"precision": "auto"}
# and the default of the commands that sample rollouts (`nanoseek grpo`, `r1`); GRPOConfig keeps False
ROLLOUT_DEFAULTS = {"compile_rollouts": "auto"}
COMPILE_CHOICES = {"on": True, "off": False, "auto": "auto"}   # the --compile flag of grpo and r1


@dataclass(frozen=True)
class MachineProfile:
    """Attributes:
        cpu: the CPU model (/proc/cpuinfo), threads: torch's CPU threads, torch: its version.
        dense_fp32, dense_bf16: GFLOP/s of a (2048 x 256) @ (256 x 768) matmul.
        grouped_fp32, grouped_bf16: GFLOP/s of the routed experts' forward and backward (see `probe`).
        attention_fp32_ms, attention_bf16_ms: forward + backward of the causal attention core (torch's fused
            kernel) at ATTENTION_SHAPE.
    """

    cpu: str
    threads: int
    torch: str
    dense_fp32: float
    dense_bf16: float
    grouped_fp32: float
    grouped_bf16: float
    attention_fp32_ms: float
    attention_bf16_ms: float

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

    @property
    def attention_fp32_pays(self) -> bool:
        """Whether bf16 training should run its attention core in fp32 on this CPU."""
        return self.attention_bf16_ms >= ATTENTION_MARGIN * self.attention_fp32_ms

    def describe(self) -> str:
        return (f"{self.cpu}; {self.threads} threads; torch {self.torch}\n"
                f"dense GEMM fp32 {self.dense_fp32:7.1f}  bf16 {self.dense_bf16:7.1f} GFLOP/s "
                f"(bf16 {self.dense_bf16 / self.dense_fp32:.2f}x)\n"
                f"experts    fp32 {self.grouped_fp32:7.1f}  bf16 {self.grouped_bf16:7.1f} GFLOP/s "
                f"(bf16 {self.grouped_bf16 / self.grouped_fp32:.2f}x)\n"
                f"a training step's matmuls: bf16 {self.bf16_speedup:.2f}x as fast ({EXPERT_SHARE:.0%} of their "
                f"FLOPs in the experts)\n"
                f"--precision auto: {self.precision} (bf16 when that is >= {BF16_MARGIN}x)\n"
                f"attention core forward + backward {'x'.join(map(str, ATTENTION_SHAPE))}: fp32 "
                f"{self.attention_fp32_ms:.1f} ms, bf16 {self.attention_bf16_ms:.1f} ms; under bf16 it runs in "
                f"{'fp32' if self.attention_fp32_pays else 'bf16'} (fp32 when that is >= {ATTENTION_MARGIN}x as fast)")


@dataclass(frozen=True)
class DecodeProfile:
    """Decode steps of the `small` preset in fp32 through the engine's ModelRunner: DECODE_ROWS rows, one token
    each, over a latent cache holding a DECODE_CONTEXT-token prompt.

    Attributes:
        cpu, threads, torch: as MachineProfile.
        eager_ms, compiled_ms: median time of a step, eager and with `compile=True`.
        compile_s: the compiled runner's first calls, at two row counts (the rollouts' batch shrinks as sequences
            finish; that compiles a second graph).
    """

    cpu: str
    threads: int
    torch: str
    eager_ms: float
    compiled_ms: float
    compile_s: float

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.compiled_ms

    def compile_pays(self, decode_steps: int) -> bool:
        """Whether compiling pays over a run of `decode_steps` decode steps: compiled steps COMPILE_MARGIN faster,
        and the time they save at the probe's step times more than the compile costs."""
        saved_s = decode_steps * (self.eager_ms - self.compiled_ms) / 1e3
        return self.speedup >= COMPILE_MARGIN and saved_s > self.compile_s

    def describe(self) -> str:
        return (f"decode step ({DECODE_ROWS} rows, small preset, fp32): eager {self.eager_ms:.1f} ms, compiled "
                f"{self.compiled_ms:.1f} ms ({self.speedup:.2f}x) after a {self.compile_s:.0f} s compile\n"
                f"--compile auto: compiled rollouts when they are >= {COMPILE_MARGIN}x as fast and the run's decode "
                f"steps save more than the compile (here: from "
                f"{self._break_even()} decode steps on)")

    def _break_even(self) -> str:
        if self.speedup < COMPILE_MARGIN:
            return "never"
        return f"{int(self.compile_s * 1e3 / (self.eager_ms - self.compiled_ms)) + 1:,}"


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
    them (on CPU, bf16 GEMMs pay a kernel build per new shape: nanoseek/model/buckets.py); and the causal attention
    core's forward and backward at ATTENTION_SHAPE in both dtypes."""
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

    qkv = torch.randn(3, *ATTENTION_SHAPE, generator=g)

    def attention_step(q, k, v):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(v.detach())

    fns, flops = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xd, wd = x.to(dtype), w.to(dtype)
        fns[f"dense_{name}"] = lambda xd=xd, wd=wd: xd @ wd.t()
        fns[f"grouped_{name}"] = lambda xg=xd.clone().requires_grad_(): experts_step(xg)
        fns[f"attention_{name}_ms"] = lambda t=qkv.to(dtype): attention_step(*t.clone().requires_grad_().unbind())
        flops[f"dense_{name}"] = 2 * tokens * dim * inter
        flops[f"grouped_{name}"] = 3 * 2 * tokens * 3 * dim * moe_inter   # forward + backward of three projections
    best = _best_seconds(fns, seconds)
    rates = {name: flops[name] / best[name] / 1e9 if name in flops else best[name] * 1e3 for name in fns}
    return MachineProfile(**_this_machine(), **rates)


def attention_core_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The attention core's dtype for training in `precision` (already resolved) on `device`: fp32 under bf16
    autocast on a CPU where the probe measured the fp32 core faster, else None (the core follows autocast)."""
    if precision not in ("bf16", "fp8") or torch.device(device).type != "cpu":
        return None
    return torch.float32 if machine_profile().attention_fp32_pays else None


def _cache_file() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "nanoseek", "machine.json")


def _this_machine() -> dict:
    """The fields that identify a measurement's machine (the profiles' first three)."""
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_key(cpu: str, threads: int, torch_version: str) -> str:
    """The cache entry of a machine: a changed CPU, thread count, torch or probe measures again."""
    return f"{cpu} | {threads} threads | torch {torch_version} | probe {PROBE_VERSION}"


def _read_cache() -> dict:
    try:
        with open(_cache_file()) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(key: str, profile, what: str, flags: str = "") -> None:
    """Cache `profile` under `key`, unless other processes kept the cores busy (load average above the core
    count): other jobs can swing one side's rate several-fold between calls. An unwritable cache only costs the
    next run another probe."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        warnings.warn(f"{what} taken on a busy machine (load average {load:.1f} on {cores} cores): not cached; "
                      f"`nanoseek info --machine {flags}--remeasure` on an idle machine stores one", stacklevel=3)
        return
    cache = _read_cache()
    cache[key] = dataclasses.asdict(profile)
    path = _cache_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def _cached(key: str, cls):
    entry = _read_cache().get(key)
    if isinstance(entry, dict):
        try:
            return cls(**entry)
        except TypeError:   # written by another version: measure again
            pass
    return None


def machine_profile(remeasure: bool = False) -> MachineProfile:
    """This machine's profile: from the cache when it holds one for this CPU, thread count and torch, else
    measured and cached (not when the machine is busy: then it is used once)."""
    key = cache_key(*_this_machine().values())
    profile = None if remeasure else _cached(key, MachineProfile)
    if profile is None:
        profile = probe()
        _store(key, profile, "precision probe")
    return profile


def decode_probe() -> DecodeProfile:
    """Time DECODE_STEPS decode steps eager and compiled, alternating, and the compiled runner's first calls."""
    from .config import ModelConfig
    from .infer.model_runner import ModelRunner
    from .model import build_model

    model = build_model(ModelConfig.preset("small"), seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.cfg.vocab_size, (DECODE_ROWS, DECODE_CONTEXT), generator=g).tolist()
    slots = list(range(DECODE_ROWS))
    runners = {c: ModelRunner(model, DECODE_ROWS, DECODE_CONTEXT + DECODE_STEPS + 2, compile=c) for c in (False, True)}
    few = slots[:DECODE_ROWS // 4]

    def step(compiled: bool, i: int, rows: list[int]) -> float:
        t0 = time.perf_counter()
        runners[compiled].logits(runners[compiled].forward([[5 + i]] * len(rows), [DECODE_CONTEXT + i] * len(rows),
                                                             rows))
        return time.perf_counter() - t0

    for runner in runners.values():
        runner.prefill(prompts, slots)
    compile_s = step(True, 0, slots) + step(True, 0, few)
    step(False, 0, slots)
    times = {False: [], True: []}
    for i in range(1, DECODE_STEPS + 1):
        for compiled in ((False, True) if i % 2 else (True, False)):
            times[compiled].append(step(compiled, i, slots))
    eager, compiled = (sorted(times[c])[len(times[c]) // 2] * 1e3 for c in (False, True))
    return DecodeProfile(**_this_machine(), eager_ms=eager, compiled_ms=compiled,
                         compile_s=max(0.0, compile_s - 2 * compiled / 1e3))


def decode_profile(remeasure: bool = False) -> DecodeProfile:
    """This machine's decode profile: cached like `machine_profile`, measured (about a minute) when missing."""
    key = cache_key(*_this_machine().values()) + " | decode"
    profile = None if remeasure else _cached(key, DecodeProfile)
    if profile is None:
        # a minute without output would look like a hang; library code prints nothing else
        print(f"nanoseek: measuring once whether compiled rollouts pay on this machine (about a minute; cached in "
              f"{_cache_file()})", file=sys.stderr, flush=True)
        profile = decode_probe()
        _store(key, profile, "decode probe", "--decode ")
    return profile


def resolve_compile_rollouts(compile_rollouts: bool | str, device: torch.device | str, decode_steps: int) -> bool:
    """`compile_rollouts` with "auto" replaced by this machine's choice for a run of about `decode_steps` decode
    steps: on CPU the decode probe's (`DecodeProfile.compile_pays`; no probe below MIN_DECODE_STEPS), elsewhere
    False (not measured there)."""
    if compile_rollouts != "auto":
        return bool(compile_rollouts)
    if torch.device(device).type != "cpu" or decode_steps < MIN_DECODE_STEPS:
        return False
    return decode_profile().compile_pays(decode_steps)


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
