"""MTP self-speculative decoding vs plain decoding on a checkpoint whose MTP head was trained.

Prompts are held-out (test-split) task questions in the R1 format; both engines decode greedily the
same number of tokens (ignore_eos), alternating call by call in one process. Reports tokens/s of each,
the speed-up, the draft acceptance rate, and whether the outputs are token-identical (they must be).

    python benchmarks/bench_speculative.py runs/ablation/aux_free/checkpoints/step-000200 --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek import LLM, SamplingParams
from nanoseek.data import generate, r1_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint folder with a trained MTP module and a tokenizer")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    plain = LLM(args.model, max_num_seqs=max(args.batch_sizes), max_model_len=512)
    spec = LLM(args.model, max_num_seqs=max(args.batch_sizes), max_model_len=512, speculative="mtp")
    examples = [e for task in ("arithmetic", "countdown", "linear") for e in generate(task, "test", 8, seed=1)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    print(f"model {args.model}; {args.new_tokens} new tokens per prompt, greedy; torch threads "
          f"{torch.get_num_threads()}")
    print("| batch | plain tokens/s | MTP speculative tokens/s | speed-up | acceptance | identical |")
    print("|---|---|---|---|---|---|")
    for bs in args.batch_sizes:
        prompts = [r1_prompt(e) for e in examples[:bs]]
        times = {"plain": [], "spec": []}
        identical = True
        before = dict(spec.spec_stats)
        for rep in range(args.reps + 1):
            order = [("plain", plain), ("spec", spec)] if rep % 2 == 0 else [("spec", spec), ("plain", plain)]
            outs = {}
            for name, llm in order:
                t0 = time.perf_counter()
                outs[name] = llm.generate(prompts, params)
                if rep > 0:  # the first round is warm-up
                    times[name].append(time.perf_counter() - t0)
            identical &= all(a.outputs[0].token_ids == b.outputs[0].token_ids
                             for a, b in zip(outs["plain"], outs["spec"]))
        after = spec.spec_stats
        drafted = after["drafted"] - before["drafted"]
        accepted = after["accepted"] - before["accepted"]
        tokens = bs * args.new_tokens
        tp, ts = tokens / statistics.median(times["plain"]), tokens / statistics.median(times["spec"])
        print(f"| {bs} | {tp:.0f} | {ts:.0f} | {ts / tp:.2f}x | {accepted / max(1, drafted):.1%} "
              f"({accepted}/{drafted}) | {identical} |")


if __name__ == "__main__":
    main()
