"""Shared helpers for the nanoseek benchmarks: timing, statistics, the nanoseek/HF model pair, FLOP counts.

Every benchmark runs nanoseek and its peer in ONE process and alternates them (A B, B A, A B, ...), so
background noise and thermal drift hit both sides equally. What one side leaves behind does not: after a
TRL GRPO run (which leaves more resident memory behind), nanoseek's next GRPO steps in the same process
measured slower than its first ones (figures: benchmarks/README.md, "Figures cited from code"), so read
the per-round lines next to the medians.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

# Nothing may reach the network: TRL's trainers send a telemetry request to the Hub when they are built,
# and huggingface_hub reads these switches once, when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import nanoseek  # noqa: E402  (after the switches above)

EXPERTS_IMPLS = ("eager", "grouped_mm", "batched_mm")


# ---- environment ----------------------------------------------------------------------------------

def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers
    return (f"{cpu}; {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")


def _cpu_times() -> tuple[int, int, int]:
    """(total, idle+iowait, steal) jiffies from /proc/stat; zeros where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0, 0
    return sum(v[:8]), v[3] + v[4], v[7] if len(v) > 7 else 0


def cpu_busy(seconds: float = 1.0) -> tuple[float, float] | None:
    """Fraction of all CPUs busy (and stolen by the hypervisor) over `seconds` while this process sleeps,
    i.e. what other jobs use; None where /proc/stat is unavailable."""
    t0, i0, s0 = _cpu_times()
    time.sleep(seconds)
    t1, i1, s1 = _cpu_times()
    if t1 <= t0:
        return None
    return 1 - (i1 - i0) / (t1 - t0), (s1 - s0) / (t1 - t0)


def load_report(when: str) -> str:
    """How busy the machine is *without* us (sampled for 1 s while idle), plus the load average."""
    one, five, fifteen = os.getloadavg()
    busy = cpu_busy(1.0)
    line = f"machine at {when}: "
    if busy is not None:
        line += f"{100 * busy[0]:.0f}% of the CPUs busy with other work (steal {100 * busy[1]:.0f}%) over 1 s; "
    line += f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (includes this process's own recent work)"
    if busy is not None and busy[0] > 0.1:
        line += ("\n  WARNING: other processes are using the CPUs; absolute numbers will be low and noisy "
                 "(the alternation keeps the nanoseek/HF ratios comparable)")
        if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            line += ("\n  TIP: on a shared machine run with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads sharing "
                     "the cores with other jobs slow every step down many times over; on an idle machine PASSIVE "
                     "costs some speed, so it is not the default (figures: benchmarks/README.md, \"Noise\")")
    return line


def quiet_transformers() -> None:
    """Silence the HF load report (the MTP layer keys it does not know) and routine warnings."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*MTP.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# ---- timing ---------------------------------------------------------------------------------------

def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def alternate(fns: dict[str, Callable[[], object]], steps: int, warmup: int = 1,
              on_result: Callable[[str, int, float, object], None] | None = None) -> dict[str, list[float]]:
    """Run each callable `warmup` times, then `steps` measured times, interleaved.

    The order flips every round (A B C, C B A, A B C, ...) so no side always runs right after the same
    neighbour. Returns the measured wall times (seconds) per name; `on_result(name, i, seconds, output)`
    sees every call, warm-up calls with i < 0.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(-warmup, steps):
        order = names if (r % 2 == 0) else names[::-1]
        for n in order:
            dt, out = timed(fns[n])
            if r >= 0:
                times[n].append(dt)
            if on_result is not None:
                on_result(n, r, dt, out)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """min..max as a percentage around the median, e.g. '+-3%'."""
    if len(xs) < 2:
        return ""
    m = median(xs)
    return f"[{100 * (min(xs) - m) / m:+.0f}%, {100 * (max(xs) - m) / m:+.0f}%]"


# ---- the model pair -------------------------------------------------------------------------------

@dataclass
class Pair:
    cfg: nanoseek.ModelConfig
    ns: nanoseek.Transformer
    hf: torch.nn.Module
    path: str


def build_pair(preset: str = "small", seed: int = 0, experts_implementation: str = "grouped_mm",
               attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
               path: str | None = None, **overrides) -> Pair:
    """A seeded nanoseek model and HF's DeepseekV3ForCausalLM loaded from its `save_pretrained` folder.

    Both hold the same weights (HF ignores the MTP layer, which it does not implement) and the same dtype.
    """
    cfg = nanoseek.ModelConfig.preset(preset, **overrides)
    ns = nanoseek.build_model(cfg, seed=seed)
    if path is None:
        path = tempfile.mkdtemp(prefix=f"nanoseek-bench-{preset}-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    nanoseek.save_pretrained(ns, path)
    hf = load_hf(path, experts_implementation, attn_implementation)
    ns, hf = ns.to(dtype), hf.to(dtype)
    return Pair(cfg, ns, hf, path)


def load_hf(path: str, experts_implementation: str = "grouped_mm", attn_implementation: str = "sdpa"):
    """HF DeepseekV3ForCausalLM (fp32) from a nanoseek `save_pretrained` folder, quietly."""
    from transformers import AutoModelForCausalLM
    quiet_transformers()
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation,
                                                  experts_implementation=experts_implementation)
    assert hf.config._attn_implementation == attn_implementation, hf.config._attn_implementation
    got = hf_experts_impl(hf)
    assert got == experts_implementation, f"asked HF for experts_implementation={experts_implementation}, got {got}"
    return hf


def hf_experts_impl(hf: torch.nn.Module) -> str:
    impl = hf.get_experts_implementation() if hasattr(hf, "get_experts_implementation") else None
    if isinstance(impl, dict):
        vals = sorted({str(v) for v in impl.values()})
        return vals[0] if len(vals) == 1 else ",".join(vals)
    return str(getattr(hf.config, "_experts_implementation", impl))


# ---- FLOP accounting ------------------------------------------------------------------------------

def active_matmul_params(model: nanoseek.Transformer) -> dict[str, int]:
    """Weights a token multiplies against in the main model (MTP excluded), by kind.

    Counted: every nn.Linear weight (attention projections, dense/shared MLPs, the router gate, lm_head)
    and the K of E routed experts (stacked gate_up_proj/down_proj scaled by K/E). Not counted: the
    embedding (a lookup, no FLOPs) and the RMSNorm weights (elementwise).
    """
    cfg = model.cfg
    out = {"attention": 0, "dense_mlp": 0, "shared_experts": 0, "routed_experts_active": 0, "router": 0,
           "lm_head": 0}
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or name == "model.embed_tokens.weight" or p.dim() < 2:
            continue
        if name == "lm_head.weight":
            out["lm_head"] += p.numel()
        elif ".self_attn." in name:
            out["attention"] += p.numel()
        elif ".mlp.experts." in name:
            out["routed_experts_active"] += p.numel() * cfg.num_experts_per_tok // cfg.n_routed_experts
        elif ".mlp.shared_experts." in name:
            out["shared_experts"] += p.numel()
        elif ".mlp.gate." in name:
            out["router"] += p.numel()
        elif ".mlp." in name:
            out["dense_mlp"] += p.numel()
        else:
            raise AssertionError(f"unclassified matmul parameter {name}")
    out["total"] = sum(out.values())
    return out


def attention_flops_per_token(cfg: nanoseek.ModelConfig, seq_len: int) -> int:
    """Training FLOPs/token of the score (QK^T) and value (AV) matmuls, PaLM convention.

    Per layer and head, a token's forward does 2*T*d_qk (scores) + 2*T*d_v (values) FLOPs against T keys;
    x3 for forward+backward: 6*T*(d_qk + d_v) = 12*T*(d_qk + d_v)/2. Like PaLM (App. B) and nanoGPT we
    count the full T x T score matrix; a causal-only count would be half of this.
    """
    return 12 * cfg.num_hidden_layers * cfg.num_attention_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim) // 2


def train_flops_per_token(model: nanoseek.Transformer, seq_len: int) -> tuple[int, dict[str, int]]:
    """6 * N_active (matmul weights per token, see active_matmul_params) + attention_flops_per_token."""
    params = active_matmul_params(model)
    att = attention_flops_per_token(model.cfg, seq_len)
    return 6 * params["total"] + att, {**params, "attention_flops": att}


def fmt_int(n: float) -> str:
    return f"{n:,.0f}"
