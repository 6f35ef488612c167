"""The attention core under bf16 autocast on CPU: in bf16 (following autocast) or in fp32 (what nanoseek's
trainers do where the machine probe finds it faster: nanoseek/machine.py, nanoseek/model/mla.py).

Two tables, each side alternated with the other in one process after warm-up:
  kernel   forward and backward of torch's fused causal attention (`F.scaled_dot_product_attention`) alone,
           rows x 4 heads x T tokens x head width 48, in fp32 and in bf16;
  model    a training step of the small preset with `nanoseek r1`'s 524-token vocabulary (forward with MTP,
           backward, fused AdamW) on a fixed random batch under bf16 autocast, with the attention core in bf16 vs
           fp32 (`set_core_dtype`), at SFT's shapes (8 x 128-256) and the R1 pretraining stage's (4 x 512); the
           step-0 losses of both sides are printed.

    python benchmarks/bench_attention_core.py
    python benchmarks/bench_attention_core.py --kernel-shapes 8x256 16x128 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.model.mla import set_core_dtype
from nanoseek.train import language_model_losses
from common import alternate, load_report, machine_info, median, spread

HEADS, WIDTH = 4, 48   # the small preset's heads and query/key width (values are padded to it)


def kernel_step(rows: int, tokens: int, dtype: torch.dtype, times: dict):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, rows, HEADS, tokens, WIDTH, generator=g).to(dtype)

    def step():   # the phases' times go to `times` (warm-up calls first)
        q, k, v = qkv.clone().requires_grad_().unbind()
        start = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mid = time.perf_counter()
        out.backward(v.detach())
        times.setdefault("forward", []).append(mid - start)
        times.setdefault("backward", []).append(time.perf_counter() - mid)
    return step


def model_step(model: nanoseek.Transformer, ids: torch.Tensor, losses: list):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, extra = language_model_losses(model, x, y)
            loss = loss + 0.3 * sum(extra) / len(extra)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel-shapes", nargs="+", default=["8x128", "8x256", "8x384", "4x512", "16x128"],
                    help="rows x tokens of the kernel table")
    ap.add_argument("--model-shapes", nargs="+", default=["8x128", "8x256", "4x512"],
                    help="batch x tokens of the model table")
    ap.add_argument("--vocab", type=int, default=524, help="the model table's vocabulary (default: nanoseek r1's)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    print(machine_info())
    print(load_report("start"))

    print("\nkernel: causal SDPA forward / backward, ms (median)")
    print(f"{'rows x T':>9s} {'fp32 fwd':>9s} {'fp32 bwd':>9s} {'bf16 fwd':>9s} {'bf16 bwd':>9s} {'bf16/fp32 (fwd+bwd)':>20s}")
    for shape in args.kernel_shapes:
        rows, tokens = map(int, shape.split("x"))
        phases = {"fp32": {}, "bf16": {}}
        alternate({name: kernel_step(rows, tokens, dtype, phases[name])
                   for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}, args.steps, args.warmup)
        ms = {name: {p: median(ts[args.warmup:]) * 1e3 for p, ts in phase.items()} for name, phase in phases.items()}
        total = {name: sum(m.values()) for name, m in ms.items()}
        print(f"{shape:>9s} {ms['fp32']['forward']:9.1f} {ms['fp32']['backward']:9.1f} {ms['bf16']['forward']:9.1f} "
              f"{ms['bf16']['backward']:9.1f} {total['bf16'] / total['fp32']:19.2f}x")

    print(f"\nmodel: small preset (vocabulary {args.vocab}) training step under bf16 autocast, s (median); "
          f"core bf16 vs fp32")
    cfg = nanoseek.ModelConfig.preset("small", vocab_size=args.vocab)
    base = nanoseek.build_model(cfg, seed=0).train()
    for shape in args.model_shapes:
        batch, tokens = map(int, shape.split("x"))
        ids = torch.randint(0, cfg.vocab_size, (batch, tokens + 1), generator=torch.Generator().manual_seed(1))
        models = {"bf16 core": copy.deepcopy(base), "fp32 core": copy.deepcopy(base)}
        set_core_dtype(models["fp32 core"], torch.float32)
        losses = {name: [] for name in models}
        times = alternate({name: model_step(m, ids, losses[name]) for name, m in models.items()},
                          args.steps, args.warmup)
        tb, tf = median(times["bf16 core"]), median(times["fp32 core"])
        print(f"{shape:>9s}: bf16 core {tb:.3f} s ({spread(times['bf16 core'])}), fp32 core {tf:.3f} s "
              f"({spread(times['fp32 core'])}): {tb / tf:.2f}x; step-0 loss {losses['bf16 core'][0]:.4f} vs "
              f"{losses['fp32 core'][0]:.4f}")
    print(load_report("end"))


if __name__ == "__main__":
    main()
