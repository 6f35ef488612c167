"""Peak resident memory while loading a checkpoint, against the checkpoint's and the loaded model's size.

`nanoseek.from_pretrained` maps each safetensors shard, fills every parameter (allocated once, in the target
dtype) from a view of the mapping and hands the pages it read back to the kernel (nanoseek/checkpoint.py), so
the peak should stay near the loaded model's size, not the model plus the files. This script writes one
checkpoint of a few hundred MB (a scaled-up `small` preset, 4 shards) in bf16 and in DeepSeek's FP8 format,
then loads it in fresh subprocesses, so that each measurement starts from a clean process:

    baseline   RSS before the load (VmRSS), after the imports and a warm-up load of a tiny checkpoint of the
               same format, so that one-time costs (lazy imports, torch's first kernels and thread pools)
               are not counted as the load's
    peak       the process's peak RSS during the load (VmHWM, reset to the baseline just before it through
               /proc/self/clear_refs; ru_maxrss where that is not allowed, which includes the warm-up)
    load peak  peak - baseline: what loading added at its worst
    model      bytes of the loaded parameters and buffers

Cases: bf16 -> bf16 (the same dtype), bf16 -> fp32 (the model twice the file), FP8 -> bf16 (dequantized on
load), FP8 kept (`keep_fp8=True`: the projections and experts stay FP8 with their scales, the rest bf16), and the
peer, transformers' `AutoModelForCausalLM.from_pretrained` on the bf16 files (it skips the MTP
layer, so its model is smaller; compare the ratios).

    python benchmarks/bench_load_memory.py                  # ~1.5 min on 2 cores (most of it writing the files)
    python benchmarks/bench_load_memory.py --hidden 512     # a smaller (~220 MB) checkpoint
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import nanoseek

MB = 1 << 20


def model_config(hidden: int) -> nanoseek.ModelConfig:
    """The `small` preset widened: ~330 MB in bf16 at hidden 640 (most of it the routed experts)."""
    return nanoseek.ModelConfig.preset("small", vocab_size=32000, hidden_size=hidden, intermediate_size=3 * hidden,
                                       moe_intermediate_size=hidden // 2, num_hidden_layers=6,
                                       num_attention_heads=8, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4,
                                       n_routed_experts=32, num_experts_per_tok=4)


def write_checkpoints(root: str, hidden: int) -> dict[str, str]:
    """{"bf16": folder, "fp8": folder} of one seeded model, each in 4 shards, and the `tiny` preset in both
    formats ("tiny-bf16", "tiny-fp8") for the warm-up loads."""
    folders = {k: os.path.join(root, k) for k in ("bf16", "fp8", "tiny-bf16", "tiny-fp8")}
    for prefix, cfg in (("tiny-", nanoseek.ModelConfig.preset("tiny")), ("", model_config(hidden))):
        model = nanoseek.build_model(cfg, seed=0).to(torch.bfloat16)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        nanoseek.save_pretrained(model, folders[prefix + "bf16"], max_shard_bytes=size // 4 + 1)
        nanoseek.save_pretrained(model, folders[prefix + "fp8"], max_shard_bytes=size // 8 + 1, fp8=True)
    return folders


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


# ---- the measured child process --------------------------------------------------------------------

def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load(mode: str, folder: str, dtype: torch.dtype) -> torch.nn.Module:
    if mode.startswith("nanoseek"):
        return nanoseek.from_pretrained(folder, dtype=dtype, progress=False, keep_fp8=mode == "nanoseek-keep-fp8")
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def child(mode: str, folder: str, dtype_name: str, warm_folder: str) -> None:
    """Load `folder` into `dtype_name` after a warm-up load of `warm_folder`; print the figures as JSON."""
    dtype = getattr(torch, dtype_name)
    if mode == "transformers":
        os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach the network
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    _load(mode, warm_folder, dtype)
    gc.collect()
    baseline = _status("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    model = _load(mode, folder, dtype)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"baseline": baseline, "peak": peak, "after": _status("VmRSS"), "model": model_bytes,
                      "seconds": seconds, "peak_source": "VmHWM" if reset else "ru_maxrss"}))


def measure(mode: str, folder: str, dtype: str, warm_folder: str) -> dict:
    """Run one load in a fresh interpreter and return its figures."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, folder, dtype, warm_folder], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=640, help="hidden size of the model (default 640: ~330 MB in bf16)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # MODE FOLDER DTYPE WARM_FOLDER
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    if not sys.platform.startswith("linux"):
        sys.exit("this benchmark reads /proc/self/status (Linux)")
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        t0 = time.perf_counter()
        folders = write_checkpoints(root, args.hidden)
        print(f"wrote the checkpoints in {time.perf_counter() - t0:.0f} s")
        cases = [("nanoseek", "bf16", "bfloat16"), ("nanoseek", "bf16", "float32"), ("nanoseek", "fp8", "bfloat16"),
                 ("nanoseek-keep-fp8", "fp8", "bfloat16"), ("transformers", "bf16", "bfloat16"),
                 ("transformers", "bf16", "float32")]
        rows = []
        for mode, kind, dtype in cases:
            r = measure(mode, folders[kind], dtype, folders["tiny-" + kind])
            r.update(mode=mode, checkpoint=kind, dtype=dtype, file=folder_bytes(folders[kind]))
            rows.append(r)
    print(f"\n{'loader':<18} {'checkpoint':>16} {'into':>9} {'model':>9} {'baseline':>9} {'load peak':>10} "
          f"{'/ model':>8} {'/ file':>7} {'time':>6}")
    for r in rows:
        added = r["peak"] - r["baseline"]
        print(f"{r['mode']:<18} {r['checkpoint']:>5} {r['file'] / MB:>7.0f} MB {r['dtype']:>9} "
              f"{r['model'] / MB:>6.0f} MB {r['baseline'] / MB:>6.0f} MB {added / MB:>7.0f} MB "
              f"{added / r['model']:>8.2f} {added / r['file']:>7.2f} {r['seconds']:>5.1f}s")
    print(f"\npeak from {rows[0]['peak_source']}; load peak = peak RSS during the load - RSS before it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
