"""Where a batched eager decode step's time goes, and what one routed-experts matmul costs.

Part 1 samples like a GRPO rollout of `bench_grpo.py` (`small` preset, vocab 2048, 4 prompts x n 8 = 32 rows,
64 new tokens, T 1.0, eager) and times every decode step and, with forward hooks, the modules inside it:
attention (MLA), routed experts, router, and the dense/shared-expert MLPs; "rest" is the step's remainder
(embedding, norms, lm_head, sampling, bookkeeping).

Part 2 times one grouped matmul of the routed experts' gate/up projection at that shape (16 experts x 8 rows)
three ways: over 16 distinct expert weights (4 MB, more than the L2 cache), over one expert's weight repeated
16 times (256 KB, stays in L2), and the same 128 rows against a single weight as one matmul.

    python benchmarks/decode_breakdown.py
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from common import machine_info

import nanoseek
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, Gate, MoE

PARTS = {MLA: "attention (MLA)", Gate: "router", MLP: "dense + shared MLPs"}
ROUTED = "routed experts"  # MoE.routed: dispatch -> experts -> combine, or an inference fast path


def time_modules(model: torch.nn.Module) -> collections.Counter:
    """Seconds spent in each PARTS kind of module (forward hooks) and in the routed experts (MoE.routed)."""
    spent, started = collections.Counter(), {}

    def timed(routed):
        def run(*args):
            t0 = time.perf_counter()
            out = routed(*args)
            spent[ROUTED] += time.perf_counter() - t0
            return out
        return run

    def pre(mod, _args):
        started[mod] = time.perf_counter()

    def post(mod, _args, _out):
        spent[PARTS[type(mod)]] += time.perf_counter() - started.pop(mod)

    for mod in model.modules():
        if type(mod) in PARTS:
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
        elif isinstance(mod, MoE):
            mod.routed = timed(mod.routed)
    return spent


def decode_breakdown(args) -> None:
    cfg = nanoseek.ModelConfig.preset("small", vocab_size=2048)
    model = nanoseek.build_model(cfg, seed=args.seed)
    llm = nanoseek.LLM(model, max_num_seqs=args.prompts * args.n, max_model_len=256)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [{"prompt_token_ids": torch.randint(3, cfg.vocab_size, (40,), generator=gen).tolist()}
               for _ in range(args.prompts)]
    params = nanoseek.SamplingParams(n=args.n, max_tokens=args.new_tokens, temperature=1.0, ignore_eos=True, seed=1)
    engine = llm.llm_engine
    decode = engine._decode_step
    steps = []

    def timed_decode(seqs):
        t0 = time.perf_counter()
        decode(seqs)
        steps.append(time.perf_counter() - t0)

    engine._decode_step = timed_decode
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    spent = time_modules(model)
    for _ in range(args.reps):
        steps.clear()
        spent.clear()
        llm.generate(prompts, params, use_tqdm=False)
    n, total = len(steps), sum(steps)
    print(f"\ndecode step at {args.prompts * args.n} rows (last of {args.reps} generate calls, {n} steps): "
          f"{total / n * 1e3:.2f} ms")
    for name in [PARTS[MLA], ROUTED, *list(PARTS.values())[1:]]:
        print(f"  {name:22s} {spent[name] / n * 1e3:6.2f} ms")
    print(f"  {'rest':22s} {(total - sum(spent.values())) / n * 1e3:6.2f} ms")


def grouped_matmul_costs(args) -> None:
    cfg = nanoseek.ModelConfig.preset("small", vocab_size=2048)
    E, D, two_i = cfg.n_routed_experts, cfg.hidden_size, 2 * cfg.moe_intermediate_size
    rows = E * 8
    x = torch.randn(rows, D)
    offsets = torch.arange(8, rows + 1, 8, dtype=torch.int32)
    distinct = torch.randn(E, two_i, D).transpose(1, 2)
    repeated = torch.randn(1, two_i, D).expand(E, two_i, D).transpose(1, 2)
    cases = {f"grouped, {E} distinct experts": lambda: torch._grouped_mm(x, distinct, offs=offsets),
             f"grouped, one weight x {E}": lambda: torch._grouped_mm(x, repeated, offs=offsets),
             f"one matmul, {rows} rows": lambda: x @ repeated[0]}
    print(f"\nrouted experts' gate/up matmul, {rows} rows ({E} experts x 8) x {D} -> {two_i}:")
    with torch.inference_mode():
        for name, fn in cases.items():
            for _ in range(200):
                fn()
            t0 = time.perf_counter()
            for _ in range(args.matmul_reps):
                fn()
            print(f"  {name:32s} {(time.perf_counter() - t0) / args.matmul_reps * 1e6:7.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=8, help="samples per prompt (default: 8)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="timed generate calls (default: 3)")
    p.add_argument("--matmul-reps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(machine_info())
    decode_breakdown(args)
    grouped_matmul_costs(args)


if __name__ == "__main__":
    main()
