"""Where does a model lose the countdown search? Step-by-step accuracy of its sampled traces.

The worked countdown solutions are a fixed backward search (nanoseek/data/tasks/countdown.py):
"We need T from a, b, c." / "Last n, rest a, b: <what a, b make>" / "<T - n = r, ...> yes." / Check / So.
For held-out level-1 problems this samples k completions per problem at the R1 evaluation settings
(T 0.6, top-p 0.95, chat template) and reports the share of samples that
- copy the target and all numbers into the first line,
- list the pair results of their first "Last" block correctly (the right operands, in the search's order),
- write a "what the rest must make" line (the first one) whose operations use the target and the last
  number of the block it follows (counted only on problems whose gold trace writes one: 44 of the default 50;
  in the others the first listing already reaches the target),
- and the share of all written "x op y = z" operations that are arithmetically right, and pass@1.
docs/r1_report.md uses it to say which step fails.

    python experiments/diagnose_countdown.py runs/r1/cold_start/model runs/r1/rs_sft/model
"""

from __future__ import annotations

import argparse
import re


from nanoseek.data.r1_format import extract_answer
from nanoseek.data.tasks.countdown import _pair, countdown_check
from nanoseek.data.tasks.expr import apply
from nanoseek.infer import LLM, SamplingParams
from nanoseek.rl.data import prompt_text, task_examples

OP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def trace_steps(text: str, nums: list[int], target: int) -> dict[str, bool]:
    """Which steps of one sampled trace are right (see the module docstring)."""
    lines = text.split("</think>")[0].splitlines()
    first = next((re.fullmatch(r"We need (\d+) from ([\d, ]+)\.", ln) for ln in lines if ln.startswith("We need")),
                 None)
    steps = {"target copied": bool(first) and int(first.group(1)) == target,
             "numbers copied": bool(first) and [int(x) for x in first.group(2).split(", ")] == nums}
    block = next((i for i, ln in enumerate(lines) if ln.startswith("Last ")), None)
    head = re.match(r"Last (\d+), rest (\d+), (\d+):", lines[block]) if block is not None else None
    if head:
        n, a, b = (int(x) for x in head.groups())
        want = [OP.fullmatch(text).groups() for text, _ in _pair((a, a), (b, b))]
        got = OP.findall(lines[block])
        steps["pair listed"] = bool(got) and got == want[:len(got)]  # the listing stops early at a "yes"
        # the first "must make" line: an operations line that is not a listing, "Check" or "So"; the first
        # block writes none when every value it would need is larger than what its pair makes
        k = next((i for i in range(block + 1, len(lines)) if OP.search(lines[i]) and ":" not in lines[i]
                  and not lines[i].startswith(("Check", "So"))), None)
        if k is not None:
            last = re.match(r"Last (\d+)", next(ln for ln in reversed(lines[:k]) if ln.startswith("Last ")))
            n = int(last.group(1)) if last else n
        needs = OP.findall(lines[k]) if k is not None else []
        steps["needs use T and n"] = bool(needs) and all(sorted((int(x), int(y))) == sorted((target, n))
                                                         for x, _, y, _ in needs)
    else:
        steps["pair listed"] = steps["needs use T and n"] = False
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model folders (with tokenizer.json)")
    ap.add_argument("--n", type=int, default=50, help="held-out level-1 problems (default 50, as the r1 report)")
    ap.add_argument("--k", type=int, default=4, help="samples per problem (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    problems = task_examples(["countdown"], "test", args.n, 1, seed=args.seed)
    for path in args.models:
        llm = LLM(path, max_num_seqs=64)
        outs = llm.generate([prompt_text(p, llm.tokenizer, "chat") for p in problems],
                            SamplingParams(n=args.k, temperature=0.6, top_p=0.95, max_tokens=256, seed=args.seed))
        totals: dict[str, list[int]] = {}  # step -> [right, counted]
        ops = ops_right = solved = samples = 0
        for p, out in zip(problems, outs):
            nums, target = p.meta["numbers"], p.meta["target"]
            # where the gold trace finds the target in its first listing it writes no "must make" line,
            # so that step is only counted on the other problems
            gold = trace_steps(p.solution, nums, target)
            for c in out.outputs:
                samples += 1
                for name, ok in trace_steps(c.text, nums, target).items():
                    if gold[name]:
                        t = totals.setdefault(name, [0, 0])
                        t[0], t[1] = t[0] + ok, t[1] + 1
                for x, op, y, z in OP.findall(c.text):
                    ops += 1
                    ops_right += int(z) == apply(op, int(x), int(y))
                answer = extract_answer(c.text)
                solved += answer is not None and countdown_check(nums, target, answer)
        shares = ", ".join(f"{name} {ok / n:.2f}" + (f" (of {n})" if n < samples else "")
                           for name, (ok, n) in totals.items())
        print(f"{path}: {samples} samples; {shares}; operations right {ops_right / max(ops, 1):.2f} of {ops}; "
              f"pass@1 {solved / samples:.3f}")


if __name__ == "__main__":
    main()
